"""Forgetting measures: KL(base || tuned) against NumPy, exactly 0 without change; the instruct model's own
answers; the generated general multiple-choice set."""

import json
import re

import jax
import numpy as np
import pytest
from tiny_hf import hf_logits, make_hf_model

from slayer_jax import surgery
from slayer_jax.cli import main
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation import forgetting
from slayer_jax.evaluation.loglik import rolling_windows
from slayer_jax.evaluation.scoring import SAMPLE_MCQ_LARGE, load_mcq
from slayer_jax.io.hf import load_hf
from slayer_jax.modeling.model import forward


def _perturbed(params, scale=0.02, seed=1, layer=1, proj="up_proj"):
    """A copy with noise on one kernel (the rest shared)."""
    layers = list(params["layers"])
    k = layers[layer][proj]["kernel"]
    noise = scale * jax.random.normal(jax.random.PRNGKey(seed), k.shape, k.dtype)
    layers[layer] = {**layers[layer], proj: {**layers[layer][proj], "kernel": k + noise}}
    return {**params, "layers": layers}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A tiny random Llama (transformers) and a perturbed copy, each loaded through our importer."""
    import torch

    base = make_hf_model("gqa_kv2", seed=0)
    tuned = make_hf_model("gqa_kv2", seed=0)
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.add_(0.05 * torch.randn_like(tuned.model.layers[1].mlp.up_proj.weight))
    out = []
    for name, m in (("base", base), ("tuned", tuned)):
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out.append((m, *load_hf(d, progress=False)[:2]))
    return out


def _numpy_kl(hf_base, hf_tuned, docs, prefix, max_length):
    """Mean KL over every token of the documents' rolling windows, from transformers' logits, in float64."""
    tot, n = 0.0, 0
    for toks in docs:
        for ctx, cont in rolling_windows(toks, prefix, max_length):
            inp = np.asarray([(ctx + cont)[:-1]])
            a = hf_logits(hf_base, inp)[0].astype(np.float64)[-len(cont):]
            b = hf_logits(hf_tuned, inp)[0].astype(np.float64)[-len(cont):]
            la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
            lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
            tot += float((np.exp(la) * (la - lb)).sum())
            n += len(cont)
    return tot / n, n


def test_kl_equals_numpy_and_blocks_do_not_matter(two_models):
    (hf_b, pb, cb), (hf_t, pt, ct) = two_models
    rng = np.random.RandomState(0)
    docs = [list(rng.randint(3, 97, n)) for n in (5, 40, 70, 1)]  # 70 > max_length: three windows
    ref, n = _numpy_kl(hf_b, hf_t, docs, 1, 32)
    res = forgetting.kl_divergence(pb, cb, pt, ct, docs, 1, 32)
    assert res["tokens"] == n == 116 and res["documents"] == 4
    assert ref > 1e-4
    np.testing.assert_allclose(res["kl"], ref, rtol=1e-4)
    # logits made 2 positions at a time (lax.map over blocks) and rows one per call: the same numbers
    small = forgetting.kl_divergence(pb, cb, pt, ct, docs, 1, 32, logits_budget=2 * 97, token_budget=32)
    np.testing.assert_allclose(small["kl"], res["kl"], rtol=1e-4, atol=1e-8)
    assert small["top1_agree"] == res["top1_agree"] < 1.0


def test_kl_is_zero_without_change_and_positive_with_one(two_models):
    (_, pb, cb), _ = two_models
    rng = np.random.RandomState(1)
    docs = [list(rng.randint(3, 97, n)) for n in (30, 50)]
    same = forgetting.kl_divergence(pb, cb, pb, cb, docs, 1, 64)
    assert same["kl"] == 0.0 and same["kl_max_doc"] == 0.0 and same["top1_agree"] == 1.0
    # an identity expansion (the S strategy's new blocks, outputs zeroed) changes nothing either
    expanded, _, _ = surgery.apply_plan(pb, surgery.shallow(3, 1))
    assert len(expanded["layers"]) == 4
    ident = forgetting.kl_divergence(pb, cb, expanded, cb, docs, 1, 64)
    assert abs(ident["kl"]) < 1e-9 and ident["top1_agree"] == 1.0
    # the new block (layer 1) moved, as a training step moves it: its zeroed output projection is not zero
    assert not np.asarray(expanded["layers"][1]["down_proj"]["kernel"]).any()
    moved = forgetting.kl_divergence(pb, cb, _perturbed(expanded, layer=1, proj="down_proj"), cb, docs, 1, 64)
    assert moved["kl"] > 1e-6 and moved["top1_agree"] <= 1.0
    with pytest.raises(SlayerError, match="vocab_size"):
        import dataclasses

        forgetting.kl_divergence(pb, cb, pb, dataclasses.replace(cb, vocab_size=98), docs, 1, 64)


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from tiny_tok import make_exported_model

    d = make_exported_model(tmp_path_factory.mktemp("chat") / "m", std=0.3)
    params, cfg, tok = load_hf(d, progress=False)
    tok.chat_template = CHAT
    return d, params, cfg, tok


def _answer_ll(params, cfg, ctx, ans):
    """log p(answer | chat prompt) by hand: one forward, log-softmax in float64."""
    lg = np.asarray(forward(params, np.asarray([ctx + ans[:-1]], np.int32), cfg), np.float64)[0]
    lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    return float(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(ans)))


def test_instruct_same_model_and_perturbed(chat_model):
    _, params, cfg, tok = chat_model
    prompts = ["Question: what?", "def f(x):", "Answer in one word."]
    same = forgetting.eval_instruct((params, cfg, tok), (params, cfg, tok), prompts, max_new_tokens=8)
    assert same["ll_per_token"] == same["base_ll_per_token"] and same["ll_drop"] == 0.0
    assert same["same_greedy"] == same["same_answer"] == 1.0 and same["prompts"] == 3
    assert [s["base"] == s["tuned"] for s in same["samples"]] == [True] * 3
    tuned = _perturbed(params, scale=0.5)
    res = forgetting.eval_instruct((params, cfg, tok), (tuned, cfg, tok), prompts, max_new_tokens=8)
    assert res["base_ll_per_token"] == same["base_ll_per_token"]
    # each sample's log-likelihood per token equals a hand computation on the base model's greedy answer
    from slayer_jax.generate import Generator

    gen = Generator(params, cfg, tok)
    ctxs = [gen.encode(p, chat=True) for p in prompts]
    for ctx, c, s in zip(ctxs, gen.generate(ctxs, 8), res["samples"]):
        ans = c.tokens
        assert len(ans) == s["base_tokens"] and c.text == s["base"]
        np.testing.assert_allclose(s["tuned_ll_per_token"], _answer_ll(tuned, cfg, ctx, ans) / len(ans), rtol=1e-4)
    assert res["ll_per_token"] != same["ll_per_token"]
    assert json.dumps(res)  # the result JSON holds the side-by-side answers


def test_eval_cli_kl_instruct_and_bad_input(chat_model, tmp_path, capsys):
    d = chat_model[0]
    out = tmp_path / "r.json"
    rc = main(["eval", str(d), "--tasks", "kl", "--base", str(d), "--limit", "2", "--max-length", "64",
               "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["tasks"]["kl"]
    assert r["kl"] == 0.0 and r["documents"] == 2 and r["base"] == str(d)
    capsys.readouterr()
    assert main(["eval", str(d), "--tasks", "instruct"]) == 2
    assert capsys.readouterr().err.strip() == ("slayer: error: --base: missing; expected the base model to compare "
                                               "with (task instruct)")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(SlayerError, match=r"prompts.jsonl: line 2: field 'prompt' is None; expected a non-empty"):
        forgetting.load_chat_prompts(bad)
    # the exported tiny tokenizer has no chat template: instruct refuses it in one line
    assert main(["eval", str(d), "--tasks", "instruct", "--base", str(d)]) == 2
    assert "no chat_template" in capsys.readouterr().err


def test_shipped_chat_prompts():
    prompts = forgetting.load_chat_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20


def test_general_mcq_large_is_the_generator_output_and_sound():
    rows = forgetting.make_general_mcq(0)
    assert rows == forgetting.make_general_mcq(0) and rows != forgetting.make_general_mcq(1)
    shipped = [json.loads(x) for x in SAMPLE_MCQ_LARGE.read_text().splitlines()]
    assert shipped == rows  # `write_general_mcq()` regenerates the shipped file exactly
    assert len(load_mcq("large")) == len(rows) >= 300
    assert len({(r["question"], *r["choices"]) for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows) - 7 * 7  # only "Which of these is a fruit?" etc. repeat
    counts = np.bincount([r["answer"] for r in rows], minlength=4)
    assert counts.max() - counts.min() <= 1  # answer positions balanced
    for r in rows:
        ch, right = r["choices"], r["choices"][r["answer"]]
        assert len(ch) == 4 and len(set(ch)) == 4
        nums = [int(x) for x in re.findall(r"\d+", r["question"])]
        if r["category"] == "addition":
            assert int(right) == nums[0] + nums[1]
        elif r["category"] == "subtraction":
            assert int(right) == nums[0] - nums[1]
        elif r["category"] == "multiplication":
            assert int(right) == nums[0] * nums[1]
        elif r["category"] == "comparison":
            assert int(right) == (max if "largest" in r["question"] else min)(int(c) for c in ch)
        elif r["category"] == "capital" and r["question"].startswith("What is the capital"):
            country = r["question"][len("What is the capital city of "):-1]
            assert forgetting.CAPITALS[country] == right
        elif r["category"] == "category":
            cat = r["question"][len("Which of these is "):-1]
            assert [c in forgetting.CATEGORIES[cat] for c in ch].count(True) == 1
        elif r["category"] == "opposite":
            word = r["question"].split('"')[1]
            assert (word, right) in forgetting.OPPOSITES or (right, word) in forgetting.OPPOSITES
            assert word not in forgetting.AMBIGUOUS_OPPOSITE
