"""Layer surgery: exact identities, exact averages, paper positions, purity, HF round trip, properties."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import hf_logits, make_hf_model

from slayer_jax import surgery
from slayer_jax.io.hf import load_hf, save_hf
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import forward, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def tiny():
    p = init_params(CFG, 6, jax.random.PRNGKey(0), std=0.2)
    # random norms and biases, so averaging/copying mistakes are visible
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 12)))


@pytest.mark.parametrize("init", ["average", "copy"])
def test_identity_expansion_keeps_logits(tiny, init):
    before = np.asarray(forward(tiny, TOKENS, CFG))
    grown = surgery.insert_layers(tiny, after=[0, 2, 5], init=init)
    assert len(grown["layers"]) == 9
    after = np.asarray(forward(grown, TOKENS, CFG))
    assert np.abs(after - before).max() <= 1e-6
    # without zeroing, the same blocks change the function: the identity is the zeroing's doing
    changed = np.asarray(forward(surgery.insert_layers(tiny, after=[0, 2, 5], init=init, identity=False), TOKENS, CFG))
    assert np.abs(changed - before).max() > 1e-3


def test_average_is_exact_mean_and_outputs_are_zero(tiny):
    grown = surgery.insert_layers(tiny, after=[2], init="average")
    new, a, b = grown["layers"][3], tiny["layers"][2], tiny["layers"][3]
    for key in a:
        for leaf in a[key]:
            got = np.asarray(new[key][leaf])
            if key in ("o_proj", "down_proj"):
                assert not got.any(), (key, leaf)  # kernels and biases exactly zero
            else:
                want = (np.asarray(a[key][leaf], np.float64) + np.asarray(b[key][leaf], np.float64)) / 2
                np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"{key}/{leaf}")


def test_copy_init_and_fallback_after_last(tiny):
    grown = surgery.insert_layers(tiny, after=[1], init="copy")
    np.testing.assert_array_equal(grown["layers"][2]["q_proj"]["kernel"], tiny["layers"][1]["q_proj"]["kernel"])
    with pytest.warns(UserWarning, match="no layer after 5"):
        tail = surgery.insert_layers(tiny, after=[5], init="average")
    np.testing.assert_array_equal(tail["layers"][6]["up_proj"]["kernel"], tiny["layers"][5]["up_proj"]["kernel"])


def test_untouched_leaves_are_the_same_objects(tiny):
    plan = surgery.shallow(6, 2, 1, refresh_last=True)
    new, mask, lmap = surgery.apply_plan(tiny, plan)
    assert new["embed"] is tiny["embed"] and new["norm"] is tiny["norm"] and new["lm_head"] is tiny["lm_head"]
    for rec, layer in zip(lmap, new["layers"]):
        if rec["kind"] == "original":
            old = tiny["layers"][rec["from"][0]]
            assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(layer), jax.tree_util.tree_leaves(old)))
        else:
            assert all(x is not y for x, y in zip(jax.tree_util.tree_leaves(layer),
                                                  jax.tree_util.tree_leaves(tiny["layers"][rec["from"][0]])))
    assert len(tiny["layers"]) == 6  # input untouched


def test_refresh_is_average_with_successor(tiny):
    new, mask, lmap = surgery.apply_plan(tiny, surgery.shallow(6, 1, 1, refresh_last=True))
    # 6 layers, block after 2, prune 5, refresh 4: the last layer is mean(4, 5), not zeroed
    assert [r["kind"] for r in lmap] == ["original"] * 3 + ["inserted", "original", "refreshed"]
    want = (np.asarray(tiny["layers"][4]["down_proj"]["kernel"]) + np.asarray(tiny["layers"][5]["down_proj"]["kernel"])) / 2
    np.testing.assert_allclose(new["layers"][-1]["down_proj"]["kernel"], want, rtol=0, atol=1e-7)


def test_paper_plan_positions():
    plan = surgery.shallow(32, 8, 2, refresh_last=True)
    assert plan.expand_after == (1, 3, 5, 7, 9, 11, 13, 15)
    assert plan.prune == (30, 31) and plan.refresh == (29,)
    expanded = surgery.layer_map(surgery.shallow(32, 8, 0))
    assert len(expanded) == 40
    assert [r["index"] for r in expanded if r["kind"] == "inserted"] == [2, 5, 8, 11, 14, 17, 20, 23]
    lmap = surgery.layer_map(plan)
    assert len(lmap) == plan.num_new_layers == 38
    assert lmap[-1] == {"kind": "refreshed", "from": [29, 30], "trainable": True, "index": 37}
    assert sum(r["trainable"] for r in lmap) == 9
    pro = surgery.layer_map(surgery.uniform(32, 8))
    assert [r["index"] for r in pro if r["kind"] == "inserted"] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert surgery.prune_layers(32, 2, "keep_last") == (29, 30)


def test_mask_selects_inserted_layers_by_index_not_substring():
    """With 24 layers the layers.2 / layers.20 / layers.21 trap is live: only the inserted ones are True."""
    cfg = CFG
    p = init_params(cfg, 22, jax.random.PRNGKey(0))
    new, mask, lmap = surgery.apply_plan(p, surgery.explicit(22, expand_after=[1, 19]))
    inserted = [r["index"] for r in lmap if r["kind"] == "inserted"]
    assert inserted == [2, 21]
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    true_layers = sorted({path[1].idx for path, m in flat if m})
    assert true_layers == [2, 21]
    for path, m in flat:
        if path[0].key != "layers":
            assert not m
    # every leaf of a trainable layer is trainable (whole blocks, both norms included)
    assert all(jax.tree_util.tree_leaves(mask["layers"][2])) and not any(jax.tree_util.tree_leaves(mask["layers"][20]))


def test_expanded_pruned_export_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("llama31_rope_llama3_untied")
    hf.save_pretrained(tmp_path / "hf")
    params, cfg, _ = load_hf(tmp_path / "hf", progress=False)
    plan = surgery.shallow(3, 1, 1, refresh_last=True)
    new, mask, lmap = surgery.apply_plan(params, plan)
    out = save_hf(new, cfg, tmp_path / "out", extra_config={"slayer": surgery.surgery_record(plan, lmap)},
                  progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3 == len(new["layers"])
    tokens = np.random.RandomState(0).randint(0, 97, (2, 16))
    ours = np.asarray(forward(new, jnp.asarray(tokens), cfg))
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval(), tokens)
    assert np.abs(ours - ref).max() < 1e-4
    # importing the expanded model restores plan, mask and layer map
    params2, _, _ = load_hf(out, progress=False)
    plan2, mask2, lmap2 = surgery.restore(params2, out)
    assert plan2 == plan and lmap2 == lmap
    assert jax.tree_util.tree_leaves(mask2) == jax.tree_util.tree_leaves(mask)


def test_cli_surgery(tmp_path, capsys):
    from slayer_jax.cli import main

    make_hf_model("gqa_kv2").save_pretrained(tmp_path / "hf")
    assert main(["surgery", str(tmp_path / "hf"), str(tmp_path / "out"), "--plan", "shallow", "--expand", "1",
                 "--prune", "1"]) == 0
    out = capsys.readouterr().out
    assert "pruning original layers [2]" in out and "inserted" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(surgery.explicit(3, expand_after=[0, 1, 2], init="copy").dumps())
    assert main(["surgery", str(tmp_path / "hf"), str(tmp_path / "out2"), "--plan", str(plan_file)]) == 0
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["num_hidden_layers"] == 6
    # a plan for another model is refused with one line, nothing written
    plan_file.write_text(surgery.explicit(30, expand_after=[0]).dumps())
    assert main(["surgery", str(tmp_path / "hf"), str(tmp_path / "out3"), "--plan", str(plan_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_layers" in err[0] and not (tmp_path / "out3").exists()


# ----------------------------------------------------------------------------- properties
@st.composite
def valid_plans(draw):
    L = draw(st.integers(2, 40))
    idx = st.lists(st.integers(0, L - 1), unique=True)
    prune = draw(idx.filter(lambda p: len(p) < L))
    expand = draw(idx.map(lambda e: [i for i in e if i not in prune]))
    refresh = draw(idx.map(lambda r: [i for i in r if i not in prune and i + 1 < L]))
    return surgery.Plan(L, expand_after=tuple(expand), prune=tuple(prune), refresh=tuple(refresh),
                        init=draw(st.sampled_from(surgery.INITS)))


@settings(max_examples=150, deadline=None)
@given(valid_plans())
def test_plan_properties(plan):
    lmap = surgery.layer_map(plan)
    assert len(lmap) == plan.num_layers + len(plan.expand_after) - len(plan.prune) == plan.num_new_layers
    assert sum(r["trainable"] for r in lmap) == len(plan.expand_after) + len(plan.refresh)
    assert surgery.Plan.from_json(json.loads(plan.dumps())) == plan
    kept = [r["from"][0] for r in lmap if r["kind"] in ("original", "refreshed")]
    assert kept == [i for i in range(plan.num_layers) if i not in plan.prune]  # order preserved


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 40), st.data())
def test_invalid_plans_always_raise(L, data):
    kind = data.draw(st.sampled_from(["out_of_range", "duplicate", "prune_all", "too_many_new", "bad_init"]))
    with pytest.raises(ValueError):
        if kind == "out_of_range":
            surgery.Plan(L, expand_after=(data.draw(st.one_of(st.integers(L, 3 * L), st.integers(-5, -1))),))
        elif kind == "duplicate":
            i = data.draw(st.integers(0, L - 1))
            surgery.Plan(L, prune=(i, i))
        elif kind == "prune_all":
            surgery.Plan(L, prune=tuple(range(L)))
        elif kind == "too_many_new":
            surgery.shallow(L, data.draw(st.integers(L // 2 + 1, 2 * L + 1)))
        else:
            surgery.Plan(L, init=data.draw(st.sampled_from(["zeros", "random", "avg"])))


@pytest.mark.slow
@pytest.mark.parametrize("init", ["average", "copy"])
def test_smollm2_identity_expansion(smollm2_dir, init):
    """On the real 30-layer model, identity expansion (paper-style, 5 blocks in the first half)
    leaves logits unchanged within 1e-5; pruning the 2 deepest layers does not."""
    params, cfg, tok = load_hf(smollm2_dir, progress=False)
    ids = jnp.asarray([tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]])
    fwd = jax.jit(forward, static_argnums=2)
    before = np.asarray(fwd(params, ids, cfg))
    grown, mask, lmap = surgery.apply_plan(params, surgery.shallow(30, 5, 0, init=init))
    assert len(grown["layers"]) == 35
    assert np.abs(np.asarray(fwd(grown, ids, cfg)) - before).max() <= 1e-5
    pruned, _, _ = surgery.apply_plan(params, surgery.shallow(30, 5, 2))
    assert np.abs(np.asarray(fwd(pruned, ids, cfg)) - before).max() > 1e-2


@pytest.mark.parametrize("kind", ["uniform", "shallow"])
def test_config_plan_init_follows_the_kind(tiny, kind):
    """With no init key set, a recipe's uniform plan (LLaMA Pro) copies the layer it follows, bit for
    bit, and a shallow plan (S strategy) averages it with its successor."""
    from slayer_jax.training.configs import base_config
    from slayer_jax.training.train import build_plan

    c = base_config()
    c.plan.kind, c.plan.expand = kind, 2
    assert c.plan.init == ""
    plan = build_plan(c.plan, len(tiny["layers"]))
    assert plan.init == {"uniform": "copy", "shallow": "average"}[kind]
    grown, _, lmap = surgery.apply_plan(tiny, plan)
    for rec in (r for r in lmap if r["kind"] == "inserted"):
        new, i = grown["layers"][rec["index"]], rec["from"][0]
        for key in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "attn_norm", "mlp_norm"):
            leaf = "scale" if key.endswith("norm") else "kernel"
            a, got = np.asarray(tiny["layers"][i][key][leaf]), np.asarray(new[key][leaf])
            if kind == "uniform":
                assert rec["from"] == [i]
                np.testing.assert_array_equal(got, a)                        # bit-equal copies
            else:
                b = np.asarray(tiny["layers"][i + 1][key][leaf])
                assert rec["from"] == [i, i + 1] and not np.array_equal(got, a)
                np.testing.assert_array_equal(got, ((a.astype(np.float64) + b) / 2).astype(np.float32))
        assert not np.asarray(new["o_proj"]["kernel"]).any() and not np.asarray(new["down_proj"]["kernel"]).any()
    c.plan.init = "average"                                                  # an explicit init still wins
    assert build_plan(c.plan, len(tiny["layers"])).init == "average"
