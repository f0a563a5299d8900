"""The knowledge-injection probe: a deterministic generator, held-out people kept out of the question-answer
text, the folder it writes, and its two scores (multiple choice against transformers, exact match by hand)."""

import json

import numpy as np
import pytest
import torch

from slayer_jax.cli import main
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation import probe
from slayer_jax.generate import Completion
from slayer_jax.io.hf import load_hf


def test_generator_is_deterministic_and_pinned():
    a, b = probe.make_task(20, 7), probe.make_task(20, 7)
    assert a == b
    assert probe.make_task(20, 8)["people"] != a["people"]
    # pinned: the task bench/knowledge_injection.py recorded its results on (24 people, seed 1234)
    t = probe.make_task(24, 1234)
    h = t["heldout"][0]
    assert (h["person"], h["choices"], h["answer_index"]) == ("Pehend Pendstoux", ["Adelaide", "Tbilisi", "Dublin",
                                                                                 "Nairobi"], 3)
    assert len(t["train_docs"]) == 24 * 3 + 12 * 5 and len(t["heldout"]) == len(t["train_questions"]) == 60


def test_heldout_people_are_disjoint_and_their_answers_never_in_question_text():
    t = probe.make_task(30, 3)
    people = t["people"]
    firsts, lasts = [p["first"] for p in people], [p["last"] for p in people]
    assert len(set(firsts)) == len(set(lasts)) == 30 and not set(firsts) & set(lasts)
    train_names = {r["person"] for r in t["train_questions"]}
    held_names = {r["person"] for r in t["heldout"]}
    assert train_names == {p["full"] for p in people[:15]} and held_names == {p["full"] for p in people[15:]}
    assert not train_names & held_names
    bios = t["train_docs"][:30 * len(probe.BIOS)]
    qa = t["train_docs"][30 * len(probe.BIOS):]
    assert all(d.startswith("Question: ") for d in qa) and not any("Question" in d for d in bios)
    text = "\n".join(t["train_docs"])
    for r in t["heldout"]:
        assert r["question"] not in text and r["prompt"] not in text
        assert not any(r["person"] in d for d in qa)  # a held-out person is only in biographies
        assert sum(r["person"] in d for d in bios) == len(probe.BIOS)
        assert r["choices"][r["answer_index"]] == r["answer"] and len(set(r["choices"])) == 4
    for r in t["train_questions"]:
        assert probe.qa_text(r) in t["train_docs"]
    # the biographies state every attribute of their person
    p = people[20]
    for d in bios[20 * len(probe.BIOS):21 * len(probe.BIOS)]:
        assert all(p[k] in d for k in probe.ATTRIBUTES)


def test_cli_writes_the_folder_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["data", "probe", "--out", str(out), "--people", "8", "--seed", "5"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "heldout.jsonl", "people.json", "probe.json", "train.jsonl", "train_questions.jsonl"]
    m = json.loads((out / "probe.json").read_text())
    assert m["seed"] == 5 and m["generator_version"] == probe.GENERATOR_VERSION
    assert m["counts"]["heldout_questions"] == 20 and m["counts"]["train_documents"] == 8 * 3 + 4 * 5
    assert "slayer data probe --out DIR --people 8 --seed 5" in (out / "README.md").read_text()
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == probe.make_task(8, 5)["train_docs"]
    loaded = probe.load_probe(out)
    assert loaded["heldout"] == probe.make_task(8, 5)["heldout"]
    capsys.readouterr()
    assert main(["data", "probe", "--out", str(out), "--people", "8"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "probe", "--out", str(out), "--people", "8", "--seed", "6", "--overwrite"]) == 0
    assert json.loads((out / "probe.json").read_text())["seed"] == 6
    # a broken record: one line naming file, line and field, exit 2
    lines = (out / "heldout.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["answer_index"] = 7
    (out / "heldout.jsonl").write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
    capsys.readouterr()
    assert main(["eval", "x", "--tasks", "probe", "--probe", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slayer: error: {out / 'heldout.jsonl'}: line 2: field 'answer_index' is 7; expected")
    assert len(err.splitlines()) == 1
    with pytest.raises(SlayerError, match="not a directory"):
        probe.load_probe(tmp_path / "nothing")


def test_normalize_and_exact_match():
    em = probe.exact_match
    assert em(" Lisbon.", "Lisbon") and em("lisbon", "Lisbon") and em("  LISBON .", "Lisbon")
    assert em(" Heidelberg University.\nQuestion: ...", "Heidelberg University")
    assert em("rock climbing", "rock climbing")
    assert not em(" Lisbon, Portugal.", "Lisbon") and not em("", "Lisbon") and not em("\nLisbon", "Lisbon")
    assert not em(" Lisbon..", "Lisbon")  # only one final period goes
    assert probe.normalize_answer(" Oslo. ") == "oslo"


class _FakeGen:
    """A Generator stand-in: answers from a table, records the call."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, max_new_tokens, **kw):
        self.calls.append(dict(kw, max_new_tokens=max_new_tokens))
        return [Completion(tokens=[1], text=self.answers[p]) for p in prompts]


def test_exact_match_accounting():
    t = probe.make_task(4, 0)
    recs = t["heldout"][:4]
    table = {recs[0]["prompt"]: f" {recs[0]['answer']}.", recs[1]["prompt"]: f" {recs[1]['answer'].upper()}",
             recs[2]["prompt"]: " no idea.", recs[3]["prompt"]: ""}
    gen = _FakeGen(table)
    acc, texts = probe.probe_em(gen, recs)
    assert acc == 0.5 and texts == [table[r["prompt"]] for r in recs]
    assert gen.calls[0]["temperature"] == 0.0 and gen.calls[0]["stop_strings"] == ("\n",)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_tok import make_exported_model

    d = make_exported_model(tmp_path_factory.mktemp("probe_tiny") / "m")
    return d, load_hf(d, progress=False)


def test_mcq_against_transformers_and_real_generator(tiny, tmp_path):
    """Each question's pick is the argmax of per-choice log-likelihoods computed with transformers by hand
    (the record's prompt, then " choice"); exact match through the real Generator stops at a newline."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    d, (params, cfg, tok) = tiny
    recs = probe.make_task(4, 1)["heldout"][:8]
    m, picks = probe.probe_mcq(params, cfg, tok, recs)
    hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(d)
    ref_picks = []
    for r in recs:
        ctx = htok(r["prompt"])["input_ids"]
        lls = []
        for c in r["choices"]:
            whole = htok(r["prompt"] + " " + c)["input_ids"]
            assert whole[:len(ctx)] == ctx
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([whole])).logits.double(), -1)[0]
            lls.append(float(sum(lp[j - 1, whole[j]] for j in range(len(ctx), len(whole)))))
        ref_picks.append(int(np.argmax(lls)))
        top = np.sort(lls)[-2:]
        assert top[1] - top[0] > 1e-4  # no near tie, so the picks must agree
    assert picks == ref_picks
    assert m["acc"] == np.mean([p == r["answer_index"] for p, r in zip(ref_picks, recs)]) and m["n"] == 8
    # eval_probe end to end (limit 3 per split), with the real Generator
    probe.write_task(probe.make_task(4, 1), tmp_path / "p")
    res = probe.eval_probe(params, cfg, tok, tmp_path / "p", limit=3, em_new_tokens=6)
    assert res["heldout_n"] == res["train_n"] == 3 and res["chance"] == 0.25
    assert res["heldout_mcq_acc"] == np.mean([p == r["answer_index"] for p, r in zip(ref_picks[:3], recs[:3])])
    assert res["people"] == 4 and res["seed"] == 1 and len(res["samples"]) == 3
    assert all("\n" not in s["generated"] for s in res["samples"])
    assert res["heldout_em"] == 0.0  # a random tiny model does not know them


@pytest.mark.slow
def test_smollm2_knows_general_questions_but_not_the_fictional_people(smollm2_dir, tmp_path):
    """The real default model: clearly above chance on the generated general questions (so forgetting
    can show as a drop there), and about chance on the probe, whose people no pretraining text holds."""
    from slayer_jax.evaluation import evaluate as ev
    from slayer_jax.evaluation.scoring import load_mcq

    params, cfg, tok = load_hf(smollm2_dir, progress=False)
    questions = [q for q in load_mcq("large") if "capital" in q.question or "opposite" in q.question][:16]
    reqs, groups = ev.mcq_requests(tok, questions)
    m = ev.mcq_metrics([r[0] for r in ev.score_requests(params, cfg, reqs)], groups, questions)
    assert m["acc"] >= 0.8, m  # capitals and opposites: 0.96 and 0.94 over the whole set
    probe.write_task(probe.make_task(24, 1234), tmp_path / "p")
    res = probe.eval_probe(params, cfg, tok, tmp_path / "p", limit=8)
    print({k: v for k, v in res.items() if k != "samples"}, m)  # with -s
    assert res["heldout_em"] == res["train_em"] == 0.0
    assert res["heldout_mcq_acc"] <= 0.5 and res["train_mcq_acc"] <= 0.5, res


def test_a_cheat_run_on_the_heldout_answers_scores_near_one(tiny):
    """Not vacuous: a model trained on the held-out split's own question-answer text (a cheat) recalls it,
    by multiple choice and by exact match, where the untrained model does not."""
    import jax
    import jax.numpy as jnp
    import optax

    from slayer_jax.generate import Generator
    from slayer_jax.modeling.loss import token_nll
    from slayer_jax.modeling.model import forward

    _, (params, cfg, tok) = tiny
    recs = probe.make_task(4, 2)["heldout"]  # 2 people x 5 questions
    before, _ = probe.probe_mcq(params, cfg, tok, recs)
    ids = [list(tok(probe.qa_text(r) + "\n")["input_ids"]) + [tok.eos_token_id] for r in recs]
    T = max(map(len, ids))
    toks = np.zeros((len(ids), T), np.int32)
    w = np.zeros((len(ids), T - 1), np.float32)
    for i, x in enumerate(ids):
        toks[i, :len(x)] = x
        w[i, :len(x) - 1] = 1
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s):
        def loss(p):
            nll = token_nll(forward(p, toks[:, :-1], cfg), toks[:, 1:])
            return jnp.sum(nll * w) / jnp.sum(w)
        val, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    p, s = params, opt.init(params)
    for _ in range(300):
        p, s, val = step(p, s)
    assert float(val) < 0.2
    after, _ = probe.probe_mcq(p, cfg, tok, recs)
    em, texts = probe.probe_em(Generator(p, cfg, tok), recs)
    print(before["acc"], after["acc"], em, float(val))  # with -s
    assert after["acc"] >= 0.9 and em >= 0.9, (after, em, texts)
    assert before["acc"] <= 0.6
