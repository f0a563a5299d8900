"""Scoring against transformers, lm-eval's conventions, pass@k, HumanEval through the sandbox, result files."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import make_hf_model

from slayer_jax.cli import build_parser
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation import evaluate as ev
from slayer_jax.io.hf import load_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model("gqa_kv2")
    d = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(d)
    params, cfg, _ = load_hf(d, progress=False)
    return hf, params, cfg


def _hf_loglik(hf, ctx, cont):
    import torch

    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits.double(), -1)[0]
    n = len(ctx)
    return float(sum(lp[n - 1 + j, t] for j, t in enumerate(cont))), \
        bool(all(int(lp[n - 1 + j].argmax()) == t for j, t in enumerate(cont)))


def test_score_requests_equal_transformers(tiny):
    """Batched, bucketed, sorted: each request's log-likelihood matches a per-request torch computation."""
    hf, params, cfg = tiny
    rng = np.random.RandomState(0)
    reqs = [(list(rng.randint(0, 97, a)), list(rng.randint(0, 97, b))) for a, b in
            [(1, 1), (5, 3), (12, 1), (30, 7), (3, 20), (40, 40), (2, 2)]]
    ctx = [5, 6, 7, 8]
    greedy_cont = []
    import torch

    for _ in range(3):  # a continuation that IS greedy, so is_greedy=True gets tested too
        with torch.no_grad():
            greedy_cont.append(int(hf(torch.tensor([ctx + greedy_cont])).logits[0, -1].argmax()))
    reqs.append((ctx, greedy_cont))
    res = ev.score_requests(params, cfg, reqs, token_budget=128)
    for (c, x), (ll, g) in zip(reqs, res):
        ref_ll, ref_g = _hf_loglik(hf, c, x)
        assert abs(ll - ref_ll) < 1e-4 * max(1, len(x)), (ll, ref_ll)
        assert g == ref_g
    assert res[-1][1] is True


def test_score_requests_truncate_from_the_left(tiny):
    hf, params, cfg = tiny
    rng = np.random.RandomState(1)
    ctx, cont = list(rng.randint(0, 97, 50)), list(rng.randint(0, 97, 6))
    (ll, _), = ev.score_requests(params, cfg, [(ctx, cont)], max_length=20)
    whole = (ctx + cont)[-21:]
    ref, _ = _hf_loglik(hf, whole[:-6], whole[-6:])
    assert abs(ll - ref) < 1e-4
    with pytest.raises(SlayerError, match="continuation of 30 tokens"):
        ev.score_requests(params, cfg, [(ctx, list(range(30)))], max_length=20)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), max_len=st.integers(1, 12))
def test_rolling_windows_equal_lm_eval(n, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    toks = list(range(100, 100 + n))
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 7, max_len, 1)]
    ours = ev.rolling_windows(toks, 7, max_len)
    assert ours == [(list(a), list(b)) for a, b in ref]
    assert [t for _, b in ours for t in b] == toks  # every token predicted exactly once
    assert all(len(a) + len(b) - 1 <= max_len for a, b in ours)


def test_rolling_loglikelihood_is_the_whole_document_when_it_fits(tiny):
    hf, params, cfg = tiny
    toks = list(np.random.RandomState(3).randint(0, 97, 30))
    one, = ev.rolling_loglikelihood(params, cfg, [toks], prefix_token=1, max_length=64)
    ref, _ = _hf_loglik(hf, [1], toks)
    assert abs(one - ref) < 1e-3
    many, = ev.rolling_loglikelihood(params, cfg, [toks], prefix_token=1, max_length=8)  # 4 windows
    ref = sum(_hf_loglik(hf, a, b)[0] for a, b in ev.rolling_windows(toks, 1, 8))
    assert abs(many - ref) < 1e-3 and abs(many - one) > 1e-2  # less context per window: another number


def test_encode_pair_follows_lm_eval():
    from tiny_tok import make_tokenizer

    tok = make_tokenizer(add_bos=True)
    ctx, cont = ev.encode_pair(tok, "Question: What is 2 plus 3?\nAnswer: ", "5")
    assert ctx[0] == tok.bos_token_id  # the tokenizer's own default decides about BOS
    assert tok.decode(ctx, skip_special_tokens=True) == "Question: What is 2 plus 3?\nAnswer:"
    assert tok.decode(cont) == " 5"  # the trailing space moved to the continuation
    ctx, cont = ev.encode_pair(tok, "", "Paris is big")
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "Paris is big"


def test_mcq_metrics_acc_norm_divides_by_characters():
    from slayer_jax.evaluation.scoring import MCQ

    # q0: choice 1 has the higher total, choice 0 the higher per-character score (lm-eval's acc_norm)
    # q1: "éé" is 2 characters but 4 bytes: per character choice 0 wins, per byte choice 1 would
    qs = [MCQ("q", ("abcdef", "xy"), 0), MCQ("q", ("ab", "éé"), 0)]
    m = ev.mcq_metrics([-2.2, -2.0, -1.0, -1.5], [[0, 1], [2, 3]], qs)
    assert m["acc"] == 0.5 and m["acc_norm"] == 1.0
    qs = [MCQ("q", ("éé", "abcdef"), 0)]
    m = ev.mcq_metrics([-5.0, -5.0], [[0, 1]], qs)  # exact tie: the first maximum wins, and it is counted
    assert m["acc"] == 1.0 and m["near_ties"] == 1


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10),
                                   (200, 13, 100), (5, 5, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert abs(ev.pass_at_k(n, c, k) - exact) < 1e-12
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 1, 4)


@pytest.fixture(scope="module")
def problems():
    return ev.load_humaneval()


def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail(problems):
    """All 164 canonical solutions pass in our sandbox; wrong completions fail (the harness is not vacuous)."""
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    res = ev.check_completions(problems, [[p["canonical_solution"]] for p in problems], workers=2)
    failed = [(p["task_id"], r[0].status, r[0].stderr[-300:]) for p, r in zip(problems, res) if not r[0].passed]
    assert not failed, failed
    s = ev.humaneval_summary(res, [1])
    assert s["pass@1"] == 1.0
    sub = problems[:12]
    wrong = [["    return None\n"], ["    pass\n"], ["    raise RuntimeError('no')\n"]] * 4
    res = ev.check_completions(sub, wrong, workers=2)
    assert not any(r[0].passed for r in res)
    # a subtle bug: the canonical solution of HumanEval/2 (truncate_number) off by one
    p2 = problems[2]
    bad = p2["canonical_solution"].replace("return number % 1.0", "return number % 1.0 + 1e-3")
    assert bad != p2["canonical_solution"]
    assert not ev.check_completions([p2], [[bad]])[0][0].passed


class _FakeGen:
    """Stands in for a Generator: canonical solutions for even problems, a wrong body for odd ones."""

    def __init__(self, problems):
        self.by_prompt = {p["prompt"]: p["canonical_solution"] for p in problems}
        self.calls = []

    def generate(self, prompts, max_new_tokens, **kw):
        from slayer_jax.generate import Completion

        self.calls.append(kw)
        out = []
        for i, p in enumerate(prompts):
            body = self.by_prompt[p] if (list(self.by_prompt).index(p) % 2 == 0) else "    return None\n"
            out.append(Completion(tokens=[1], text=body + "\ndef extra():\n    pass\n"))  # text past a stop string
        return out


def test_eval_humaneval_plumbing(problems, tmp_path):
    gen = _FakeGen(problems[:6])
    s = ev.eval_humaneval(gen, problems=problems[:6], samples_out=tmp_path / "s.jsonl", progress=False)
    assert s["pass@1"] == 0.5 and s["problems"] == 6
    assert gen.calls[0]["stop_strings"] == ev.HUMANEVAL_STOP and gen.calls[0]["temperature"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["status"] == "passed" for r in rows] == [True, False] * 3
    assert "def extra" not in rows[0]["completion"]  # truncated at the stop sequence
    with pytest.raises(SlayerError, match="temperature"):
        ev.eval_humaneval(gen, problems=problems[:2], n_samples=5, ks=[1, 5])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tiny_tok import make_exported_model

    return make_exported_model(tmp_path_factory.mktemp("exp") / "m")


def test_eval_cli_writes_json_and_compare_orders_roles(exported, tmp_path, capsys):
    from tiny_tok import TASKS_DIR

    p = build_parser()
    outs = []
    for role in ("trained", "base"):
        out = tmp_path / f"{role}.json"
        a = p.parse_args(["eval", str(exported), "--tasks", "ppl,mcq,harness:slayer_mcq", "--mcq",
                          str(TASKS_DIR / "mcq.jsonl"), "--text", str(TASKS_DIR / "texts.jsonl"), "--out", str(out),
                          "--role", role, "--name", role, "--max-length", "64"])
        assert a.fn(a) == 0
        outs.append(out)
    r = json.loads(outs[0].read_text())
    assert r["num_layers"] == 2 and r["role"] == "trained"
    assert r["tasks"]["ppl"]["tokens"] > 100 and r["tasks"]["ppl"]["ppl"] > 1
    # our mcq task and lm-eval's slayer_mcq (through our backend) score the same requests
    assert r["tasks"]["mcq"]["acc"] == r["tasks"]["harness:slayer_mcq"]["acc"]
    assert r["tasks"]["mcq"]["acc_norm"] == r["tasks"]["harness:slayer_mcq"]["acc_norm"]
    capsys.readouterr()
    a = p.parse_args(["compare", str(outs[0]), str(outs[1])])
    assert a.fn(a) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert header.index("base (base)") < header.index("trained (trained)")
    assert "mcq.acc" in table and "harness:slayer_mcq.acc" in table


def test_cli_bad_input(tmp_path):
    p = build_parser()
    a = p.parse_args(["eval", "x", "--tasks", "ppl,bogus"])
    with pytest.raises(SlayerError, match="unknown task 'bogus'"):
        a.fn(a)
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    a = p.parse_args(["compare", str(bad)])
    with pytest.raises(SlayerError, match="r.json: not valid JSON"):
        a.fn(a)
    bad.write_text('{"model": "x"}')
    with pytest.raises(SlayerError, match="field 'tasks'"):
        a.fn(a)
    a = p.parse_args(["eval", "x", "--tasks", "humaneval", "--k", "1,ten"])
    with pytest.raises(SlayerError, match="--k"):
        a.fn(a)


def test_packed_mcq_scorer_agrees_with_request_scorer(exported):
    """The importance/demo scorer (scoring.py: choices packed into shared rows) and the eval / lm-eval
    scorer (evaluate.py: one request per choice) give the same per-choice log-likelihoods and the
    same acc / acc_norm (both normalise by characters of the choice, as lm-eval does)."""
    from tiny_tok import TASKS_DIR

    from slayer_jax.evaluation import scoring

    params, cfg, tok = load_hf(exported, progress=False)
    questions = scoring.load_mcq(TASKS_DIR / "mcq.jsonl")
    text = scoring.load_text(TASKS_DIR / "texts.jsonl") * 4  # enough for one text window
    es = scoring.build_evalset(tok, text, questions, seq_len=128, max_windows=1)
    packed = scoring.score_params(params, es, cfg)
    reqs, groups = ev.mcq_requests(tok, questions)
    per_request = [r[0] for r in ev.score_requests(params, cfg, reqs, max_length=128)]
    for ids, g in zip(es.mcq_items, groups):
        np.testing.assert_allclose(packed.loglik[ids], [per_request[i] for i in g], rtol=1e-4, atol=1e-4)
    m_packed, m_req = packed.metrics(es), ev.mcq_metrics(per_request, groups, questions)
    assert (m_packed["acc"], m_packed["acc_norm"]) == (m_req["acc"], m_req["acc_norm"])


def test_eval_limit_applies_to_every_task(exported, tmp_path):
    """--limit N: the first N documents (ppl), questions (mcq) and lm-eval documents, not HumanEval only."""
    from tiny_tok import TASKS_DIR

    p = build_parser()
    common = ["--mcq", str(TASKS_DIR / "mcq.jsonl"), "--text", str(TASKS_DIR / "texts.jsonl"), "--max-length", "64"]
    full = tmp_path / "full.json"
    a = p.parse_args(["eval", str(exported), "--tasks", "ppl,mcq", *common, "--out", str(full)])
    assert a.fn(a) == 0
    cut = tmp_path / "cut.json"
    a = p.parse_args(["eval", str(exported), "--tasks", "ppl,mcq,harness:slayer_mcq", *common, "--limit", "2",
                      "--out", str(cut)])
    assert a.fn(a) == 0
    f, c = json.loads(full.read_text())["tasks"], json.loads(cut.read_text())["tasks"]
    assert f["ppl"]["documents"] > 2 and c["ppl"]["documents"] == 2
    assert f["mcq"]["n"] > 2 and c["mcq"]["n"] == 2
    assert c["mcq"]["acc"] == c["harness:slayer_mcq"]["acc"]  # lm-eval scored the same 2 questions
    a = p.parse_args(["eval", str(exported), "--limit", "0"])
    with pytest.raises(SlayerError, match="--limit: 0; expected a positive number"):
        a.fn(a)
