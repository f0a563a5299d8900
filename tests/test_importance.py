"""Layer importance: hand-computed metrics, identity blocks, one-compile sweeps vs explicit surgery, CLI.

References are independent of the code under test: numpy arccos of hand-built vectors, and a
"fresh evaluation" that runs :func:`slayer_jax.modeling.model.forward` (the plain Python loop over the
layer list) on each text window and on each ``context + choice`` sequence separately, after an
explicit :func:`surgery.remove_layers` / :func:`surgery.insert_layers`.
"""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slayer_jax import importance, surgery
from slayer_jax.cli import main as cli_main
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation import scoring
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import forward, init_params

CFGS = {
    "llama_bias": ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True),
    "mistral_window": ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, model_type="mistral", sliding_window=5,
                                  tie_word_embeddings=True, rope_theta=1e6),
}
N_LAYERS = 5
SEQ = 16


def _randomised(cfg, n_layers, seed=0):
    p = init_params(cfg, n_layers, jax.random.PRNGKey(seed), std=0.2)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]  # norms, biases non-trivial
    return jax.tree_util.tree_unflatten(tree, leaves)


def _data(vocab, seed=0, n_windows=5, n_q=7):
    rng = np.random.RandomState(seed)
    wins = [list(rng.randint(0, vocab, SEQ)) for _ in range(n_windows)]
    qs = [{"context": list(rng.randint(0, vocab, rng.randint(2, 7))),
           "choices": [list(rng.randint(0, vocab, rng.randint(1, 4))) for _ in range(4)],
           "answer": int(rng.randint(4))} for _ in range(n_q)]
    return wins, qs


def _setup(name):
    cfg = CFGS[name]
    params = _randomised(cfg, N_LAYERS)
    wins, qs = _data(cfg.vocab_size)
    return cfg, params, wins, qs, scoring.pack(wins, qs, SEQ, batch_size=4)


@pytest.fixture(scope="module", params=sorted(CFGS))
def setup(request):
    """Both configs: biases (the gate must zero them too), GQA, a sliding window, tied embeddings."""
    return _setup(request.param)


@pytest.fixture(scope="module")
def setup1():
    return _setup("llama_bias")


# ----------------------------------------------------------------------------- the independent reference
_jforward = jax.jit(forward, static_argnums=(2,), static_argnames=("return_hidden",))  # model.forward, compiled


def fresh_eval(params, cfg, wins, qs):
    """Per-item summed log-likelihoods, each sequence run alone through model.forward."""
    seqs, spans = [], []
    for w in wins:
        seqs.append(list(w))
        spans.append((1, len(w)))
    for q in qs:
        for c in q["choices"]:
            seqs.append(list(q["context"]) + list(c))
            spans.append((len(q["context"]), len(q["context"]) + len(c)))
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s  # right padding never influences earlier tokens (causal)
    logp = np.asarray(jax.nn.log_softmax(_jforward(params, jnp.asarray(toks), cfg), axis=-1), np.float64)
    return np.array([sum(logp[i, t - 1, toks[i, t]] for t in range(a, b)) for i, (a, b) in enumerate(spans)])


def metrics_from(loglik, wins, qs):
    n = len(wins)
    nll = -loglik[:n].sum() / sum(len(w) - 1 for w in wins)
    k, correct = n, 0
    for q in qs:
        ll = loglik[k:k + len(q["choices"])]
        correct += int(np.argmax(ll) == q["answer"])
        k += len(q["choices"])
    return {"nll": nll, "ppl": math.exp(nll), "acc": correct / len(qs)}


def assert_metrics_close(got, want, tol=1e-5):
    assert abs(got["nll"] - want["nll"]) <= tol, (got, want)
    assert abs(got["ppl"] - want["ppl"]) <= tol * want["ppl"], (got, want)
    assert got["acc"] == want["acc"], (got, want)


# ----------------------------------------------------------------------------- metrics by hand
def _ang(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    return math.acos(max(-1.0, min(1.0, c))) / math.pi, c


def test_metrics_equal_hand_computation():
    # 4 residual states (3 layers), 1 row of 3 tokens, D = 3
    x0 = [[1, 0, 0], [1, 1, 0], [0, 0, 2]]
    x1 = [[0, 1, 0], [1, 1, 0], [0, 1, 1]]   # token 1 unchanged by layer 0
    x2 = [[0, 1, 0], [1, 1, 0], [0, 1, 1]]   # layer 1 is an identity
    x3 = [[-1, 0, 0], [2, -1, 3], [1, 1, 1]]
    H = [x0, x1, x2, x3]
    tw = np.array([[1.0, 1.0, 0.0]])  # token 2 left out of the all-token mean
    out = importance.block_metrics([jnp.asarray([h], jnp.float32) for h in H], token_weight=tw)
    for n in (1, 2, 3):
        for l in range(4 - n):
            pairs = [_ang(H[l][t], H[l + n][t]) for t in range(3)]
            want_mean = (pairs[0][0] + pairs[1][0]) / 2
            want_last = pairs[2][0]
            want_cos = (pairs[0][1] + pairs[1][1]) / 2
            assert out["angular_mean"][n - 1, l] == pytest.approx(want_mean, abs=1e-6)
            assert out["angular_last"][n - 1, l] == pytest.approx(want_last, abs=1e-6)
            assert out["cos_mean"][n - 1, l] == pytest.approx(want_cos, abs=1e-6)
        assert np.isnan(out["angular_last"][n - 1, 4 - n:]).all()  # blocks past the end
    # spot values: a right angle is 1/2, opposite vectors are 1
    assert out["angular_last"][0, 0] == pytest.approx(math.acos(2 / math.sqrt(8)) / math.pi, abs=1e-6)
    assert out["angular_mean"][0, 0] == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)
    assert out["angular_mean"][1, 0] == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)
    assert out["per_layer"]["bi"][0] == pytest.approx(1 - (0.0 + 1.0) / 2, abs=1e-6)
    # the identity layer: exactly 0, not 1e-4 from arccos(0.9999999)
    assert out["per_layer"]["angular_last"][1] == 0.0
    assert out["per_layer"]["angular_mean"][1] == 0.0
    assert out["per_layer"]["bi"][1] == 0.0


def test_identical_high_dim_states_score_exactly_zero():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 576)) * 40.0
    out = importance.block_metrics([x, x, 1.5 * x, -x])
    assert out["per_layer"]["angular_mean"][0] == 0.0 and out["per_layer"]["bi"][0] == 0.0
    assert out["per_layer"]["angular_mean"][1] == pytest.approx(0.0, abs=1e-5)  # scaling keeps the angle
    assert out["per_layer"]["angular_mean"][2] == pytest.approx(1.0, abs=1e-6)
    assert out["per_layer"]["bi"][2] == pytest.approx(2.0, abs=1e-6)


def test_model_metrics_come_from_each_layers_input_and_output(setup1):
    """The sweep's hidden pass equals block_metrics on model.forward's residual states (entry l = layer
    l's input, entry L = last layer's output *before* the final norm)."""
    cfg, params, wins, _, es = setup1
    got = importance.model_block_metrics(params, es, cfg)
    toks = jnp.asarray(np.array(wins, np.int32))
    _, hidden = _jforward(params, toks, cfg, return_hidden=True)
    want = importance.block_metrics(hidden)
    for key in ("angular_last", "angular_mean", "cos_mean"):
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, equal_nan=True)
    # the post-norm state is a different thing: using it for the last layer changes the score
    post = importance.block_metrics(list(hidden[:-1]) + [_final_norm(params, cfg, hidden[-1])])
    assert abs(post["per_layer"]["angular_mean"][-1] - want["per_layer"]["angular_mean"][-1]) > 1e-3


def _final_norm(params, cfg, x):
    from slayer_jax.modeling.model import RMSNorm

    return RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, x)


# ----------------------------------------------------------------------------- identity blocks
def test_identity_block_scores_zero_and_removing_it_changes_nothing(setup1):
    cfg, params, wins, qs, es = setup1
    grown = surgery.insert_layers(params, after=[1], init="average", identity=True)  # layer 2 is an identity
    hm = importance.model_block_metrics(grown, es, cfg)
    assert hm["per_layer"]["angular_last"][2] == 0.0
    assert hm["per_layer"]["angular_mean"][2] == 0.0
    assert hm["per_layer"]["bi"][2] == 0.0
    assert hm["per_layer"]["angular_mean"][1] > 1e-3  # the others are not vacuous

    base = scoring.score_params(params, es, cfg).metrics(es)
    res = importance.sweep(grown, es, cfg, "removal", layers=[1, 2, 3], progress=False)
    for k, v in base.items():
        assert res["baseline"][k] == pytest.approx(v, abs=1e-6)  # adding the identity changed nothing
    row = {r["layer"]: r for r in res["layers"]}[2]
    for k, v in base.items():  # every metric unchanged, every drop zero
        assert row[k] == pytest.approx(v, abs=1e-6), k
    for k in ("nll_increase", "ppl_increase", "acc_drop", "acc_norm_drop"):
        assert row[k] == pytest.approx(0.0, abs=1e-5), k
    assert abs(row_of(res, 1)["nll_increase"]) > 1e-4  # removing a real layer does change them

    # an identity-gated expansion slot changes nothing either; a copy does
    rest, st = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    ident = scoring.score_slots(rest, st, importance.expansion_slots(N_LAYERS, 2, identity=True), es, cfg)
    assert ident.metrics(es)["nll"] == pytest.approx(base["nll"], abs=1e-6)
    copy = scoring.score_slots(rest, st, importance.expansion_slots(N_LAYERS, 2), es, cfg)
    assert abs(copy.metrics(es)["nll"] - base["nll"]) > 1e-4


def row_of(res, layer):
    return {r["layer"]: r for r in res["layers"]}[layer]


# ----------------------------------------------------------------------------- sweeps vs explicit surgery
def test_intact_scores_equal_fresh_evaluation(setup):
    """Packing (windows and choice trees in shared rows) is invisible: same per-item log-likelihoods."""
    cfg, params, wins, qs, es = setup
    got = scoring.score_params(params, es, cfg)
    want = fresh_eval(params, cfg, wins, qs)
    np.testing.assert_allclose(got.loglik, want, rtol=1e-5, atol=1e-5)
    assert got.count.tolist() == [len(w) - 1 for w in wins] + [len(c) for q in qs for c in q["choices"]]
    assert_metrics_close(got.metrics(es), metrics_from(want, wins, qs))


@pytest.mark.parametrize("kind,init", [("removal", None), ("expansion", "copy"), ("expansion", "average")])
def test_one_compile_sweep_matches_explicit_surgery(setup, kind, init):
    cfg, params, wins, qs, es = setup
    layers = [0, 2, N_LAYERS - 1]  # first, middle, last (average after the last falls back to a copy)
    res = importance.sweep(params, es, cfg, kind, init=init or "copy", progress=False)
    base_ref = metrics_from(fresh_eval(params, cfg, wins, qs), wins, qs)
    assert_metrics_close(res["baseline"], base_ref)
    rest, st = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    for l in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no layer after ... using a copy"
            explicit = (surgery.remove_layers(params, [l]) if kind == "removal"
                        else surgery.insert_layers(params, [l], init=init, identity=False))
        want_ll = fresh_eval(explicit, cfg, wins, qs)
        want = metrics_from(want_ll, wins, qs)
        got = row_of(res, l)
        assert_metrics_close(got, want)
        assert got["nll_increase"] == pytest.approx(want["nll"] - base_ref["nll"], abs=2e-5)
        assert got["acc_drop"] == pytest.approx(base_ref["acc"] - want["acc"], abs=1e-12)
        slots = (importance.removal_slots(N_LAYERS, l) if kind == "removal"
                 else importance.expansion_slots(N_LAYERS, l, init))
        np.testing.assert_allclose(scoring.score_slots(rest, st, slots, es, cfg).loglik, want_ll, rtol=1e-5,
                                   atol=1e-5)


def test_each_sweep_kind_compiles_exactly_once():
    cfg = ModelConfig(vocab_size=53, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8)  # a config no other test traced
    params = _randomised(cfg, 4, seed=3)
    wins, qs = _data(cfg.vocab_size, seed=3, n_windows=6, n_q=9)
    es = scoring.pack(wins, qs, SEQ, batch_size=2)
    assert len(es.batches()) > 2  # several batches and L+1 variants, still one trace
    for kind in ("removal", "expansion"):
        res = importance.sweep(params, es, cfg, kind, progress=False)
        assert res["compile_count"] == 1, kind
        assert res["passes"] == 5
        assert importance.sweep(params, es, cfg, kind, init="average", progress=False)["compile_count"] == 0


# ----------------------------------------------------------------------------- data files
def test_shipped_samples_load():
    docs = scoring.load_text("sample")
    qs = scoring.load_mcq("sample")
    assert len(docs) >= 10 and sum(len(d.split()) for d in docs) > 2000
    assert len(qs) >= 40 and all(len(q.choices) == 4 for q in qs)
    assert sorted({q.answer for q in qs}) == [0, 1, 2, 3]


@pytest.mark.parametrize("line,field", [
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "answer"),
    ({"question": "Q?", "choices": ["a"], "answer": 0}, "choices"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "1"}, "answer"),
])
def test_bad_mcq_names_file_line_and_field(tmp_path, line, field):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "ok?", "choices": ["x", "y"], "answer": 0}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(SlayerError) as e:
        scoring.load_mcq(p)
    msg = str(e.value)
    assert str(p) in msg and "line 2" in msg and f"'{field}'" in msg and "expected" in msg and "\n" not in msg


def test_bad_text_names_file_and_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(SlayerError, match=r"t\.jsonl: line 2: field 'text'"):
        scoring.load_text(p)
    with pytest.raises(SlayerError, match="not found"):
        scoring.load_text(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- plan
def test_plan_from_profile_is_loadable_and_reasoned():
    L = 12
    rows = [{"layer": l, "removal_nll_increase": s, "angular_mean": 0.1, "bi": 0.1}
            for l, s in enumerate([5, .1, .9, .2, .8, .3, .05, .04, .02, .01, .03, 2])]
    profile = {"num_layers": L, "layers": rows, "shape": importance.shape_summary(rows)}
    plan, why = importance.recommend_plan(profile, "removal_nll", n_expand=3, n_prune=2)
    assert plan.expand_after == (0, 2, 4)  # the 3 most important of the first half
    assert plan.prune == (8, 9)  # the 2 least important deep layers; the final layer is never pruned
    again = surgery.Plan.from_json(json.loads(plan.dumps()))
    assert again == plan and "removal_nll" in again.notes and "0 (5)" in again.notes
    assert why["expand_after"] == [0, 2, 4] and len(why["scores"]) == L
    with pytest.raises(SlayerError, match="expansion sweep"):
        importance.recommend_plan(profile, "expansion_nll")


def test_spearman_and_shape_summary():
    assert importance.spearman([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert importance.spearman([0, 1, 2, 3], [1, 1, 2, 5]) == pytest.approx(np.corrcoef([0, 1, 2, 3],
                                                                                       [0.5, 0.5, 2, 3])[0, 1])
    rows = [{"layer": l, "bi": 1.0 / (l + 1)} for l in range(6)]
    s = importance.shape_summary(rows)["bi"]
    assert s["shallow_larger"] and s["spearman_vs_depth"] == pytest.approx(-1.0) and s["argmax_layer"] == 0


# ----------------------------------------------------------------------------- CLI end to end (tiny model)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slayer_jax.io.hf import save_hf

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(scoring.load_text("sample"), trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>"],
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>")
    cfg = ModelConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, bos_token_id=0, eos_token_id=0)
    d = tmp_path_factory.mktemp("tinyimp") / "model"
    save_hf(_randomised(cfg, 4, seed=7), cfg, d, tokenizer=tok, progress=False)
    return d


def test_cli_writes_profile_plots_and_a_plan_surgery_accepts(tiny_dir, tmp_path, capsys):
    from slayer_jax import cli

    out = tmp_path / "imp"
    rc = cli_main(["importance", str(tiny_dir), "--out", str(out), "--seq-len", "64", "--windows", "3", "--mcq-limit", "6",
                          "--batch-size", "4", "--no-progress", "--plan-expand", "2", "--plan-prune", "1"])
    assert rc == 0
    lines = (out / "importance.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("layer,angular_last,angular_mean,bi,removal_")
    doc = json.loads((out / "importance.json").read_text())
    assert doc["num_layers"] == 4 and len(doc["layers"]) == 4 and doc["compiles"] == {"removal": 1, "expansion": 1}
    assert len(doc["block_matrix"]["angular_last"]) == 4 and doc["block_matrix"]["angular_last"][3][1] is None
    assert {"nll", "ppl", "acc", "acc_norm"} <= set(doc["baseline"])
    for png in ("importance_metrics.png", "importance_drops.png", "importance_blocks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = surgery.Plan.from_json(json.loads((out / "recommended_plan.json").read_text()))
    assert plan.num_layers == 4 and len(plan.expand_after) == 2 and len(plan.prune) == 1 and plan.notes
    assert surgery.Plan.from_json(doc["plan"]["plan"]) == plan
    # the surgery CLI accepts the file as it is
    rc = cli.main(["surgery", str(tiny_dir), str(tmp_path / "grown"), "--plan", str(out / "recommended_plan.json")])
    assert rc == 0
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["num_hidden_layers"] == 5
    capsys.readouterr()


def test_cli_bad_input_is_one_line_exit_2(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "choices": ["a", "b", "c"], "answer": 3}\n')
    rc = cli_main(["importance", str(tiny_dir), "--mcq", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(bad) in err[0] and "'answer'" in err[0] and "0..2" in err[0]
    rc = cli_main(["importance", str(tiny_dir), "--sweeps", "removal,grow", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--sweeps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_removal_profile(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct (30 layers), a tiny sample, the removal sweep through the CLI: the curves
    exist for all 30 layers, the sweep compiles once, and removing layer 0 (embedding-adjacent) hurts
    perplexity far more than removing a typical middle layer."""
    out = tmp_path / "smol"
    rc = cli_main(["importance", str(smollm2_dir), "--out", str(out), "--seq-len", "40", "--windows", "2",
                          "--mcq-limit", "3", "--batch-size", "4", "--sweeps", "removal", "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "importance.json").read_text())
    rows = doc["layers"]
    assert doc["num_layers"] == 30 and len(rows) == 30 and doc["compiles"]["removal"] == 1
    assert 3 < doc["baseline"]["ppl"] < 200  # a working model on plain English
    mid = np.median([r["removal_nll_increase"] for r in rows])
    assert rows[0]["removal_nll_increase"] > 1.0 > abs(mid)
    ang = [r["angular_mean"] for r in rows]
    assert all(0 < a < 1 for a in ang) and ang[0] > np.median(ang)
    assert (out / "importance_metrics.png").is_file()
    surgery.Plan.from_json(json.loads((out / "recommended_plan.json").read_text()))


def test_the_new_block_rule_has_one_definition_surgery_and_sweeps_follow_a_change(monkeypatch):
    """Change which projections the rule zeroes, in surgery alone: the surgery's identity block and
    the sweep's identity-gated expansion slot both stop being identities, and still agree with
    each other (the sweep builds its variants with surgery's own rule)."""
    cfg = CFGS["llama_bias"]
    params = _randomised(cfg, N_LAYERS)
    wins, qs = _data(cfg.vocab_size)
    es = scoring.pack(wins, qs, SEQ, batch_size=4)
    rest, st = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    base = scoring.score_params(params, es, cfg).loglik

    def both(init):
        grown = surgery.insert_layers(params, [2], init=init, identity=True)
        explicit = scoring.score_params(grown, es, cfg).loglik
        slots = scoring.score_slots(rest, st, importance.expansion_slots(N_LAYERS, 2, init, identity=True), es,
                                    cfg).loglik
        return grown["layers"][3], explicit, slots

    for init in ("copy", "average"):
        block, explicit, slots = both(init)
        assert not np.asarray(block["down_proj"]["kernel"]).any()
        np.testing.assert_allclose(explicit, base, atol=1e-5)
        np.testing.assert_allclose(slots, base, atol=1e-5)

    monkeypatch.setattr(surgery, "ZEROED", ("o_proj",))  # one place: the rule now leaves down_proj alone
    scoring.layer_logprobs.clear_cache()  # traced before the change
    for init in ("copy", "average"):
        block, explicit, slots = both(init)
        assert np.asarray(block["down_proj"]["kernel"]).any() and not np.asarray(block["o_proj"]["kernel"]).any()
        assert np.abs(explicit - base).max() > 1e-3  # no longer an identity ...
        np.testing.assert_allclose(slots, explicit, atol=1e-5)  # ... and the sweep follows the surgery
    scoring.layer_logprobs.clear_cache()
