"""Per-group optimizer settings (learning-rate and weight-decay multipliers by provenance or role)
and the LoRA baseline (rank-r adapters on the frozen projections, merged on export)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slayer_jax import surgery
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import forward, init_params, merge_adapters
from slayer_jax.training.step import OptimConfig, decay_mask, make_optimizer, param_groups, split_params

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, attention_bias=True, mlp_bias=True)
TOKENS = jnp.array([[3, 7, 11, 2, 5, 9, 1, 4]])


@pytest.fixture(scope="module")
def expanded():
    """A 6-layer model with the S strategy plus a refreshed last layer and embeddings trainable."""
    params = init_params(CFG, 6, jax.random.PRNGKey(0))
    plan = surgery.shallow(6, 2, n_prune=1, refresh_last=True, train_embed=True)
    new, mask, lmap = surgery.apply_plan(params, plan)
    trainable, _ = split_params(new, mask)
    return trainable, lmap


def _steps(tx, params, n=3, seed=1):
    """n updates of ``tx`` from the same random gradients; the list of updates."""
    state, out = tx.init(params), []
    for i in range(n):
        g = jax.tree_util.tree_map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(seed + i), p.shape), params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def test_param_groups_follow_the_layer_map_and_roles(expanded):
    trainable, lmap = expanded
    groups = param_groups(trainable, [r["kind"] for r in lmap])
    kinds = [r["kind"] for r in lmap]
    assert kinds.count("inserted") == 2 and kinds.count("refreshed") == 1
    for i, r in enumerate(lmap):
        leaves = jax.tree_util.tree_leaves(groups["layers"][i])
        assert leaves == ([r["kind"]] * len(leaves) if r["trainable"] else []), i  # frozen layers: None
    assert set(jax.tree_util.tree_leaves(groups["embed"])) == {"embed"}
    assert jax.tree_util.tree_leaves(groups["norm"]) == []  # not trainable in this plan


def test_no_multipliers_is_optax_adamw_exactly(expanded):
    trainable, lmap = expanded
    c = OptimConfig(total_steps=10, peak_lr=1e-2, warmup_frac=0.0)
    ours = make_optimizer(c, param_groups(trainable, [r["kind"] for r in lmap]))
    ref = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, c.peak_lr, 0, 10), b1=c.b1, b2=c.b2,
                                  eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
    for a, b in zip(_steps(ours, trainable), _steps(ref, trainable)):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lr_and_wd_multipliers_act_on_their_group_only(expanded):
    trainable, lmap = expanded
    groups = param_groups(trainable, [r["kind"] for r in lmap])
    base = dict(total_steps=10, peak_lr=1e-2, warmup_frac=0.0, weight_decay=0.0)
    plain = _steps(make_optimizer(OptimConfig(**base), groups), trainable)
    fast = _steps(make_optimizer(OptimConfig(**base, lr_mult=(("inserted", 5.0),)), groups), trainable)
    # Adam's update does not depend on the step size, so 5x the rate is 5x the update, step by step
    for p, f in zip(plain, fast):
        for g, x, y in zip(jax.tree_util.tree_leaves(groups), jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(f)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x) * (5.0 if g == "inserted" else 1.0), rtol=1e-6)
    # weight decay x0 for the refreshed layer: its update is the no-decay update; others keep decay
    wd = dict(base, weight_decay=0.5)
    decayed = _steps(make_optimizer(OptimConfig(**wd), groups), trainable, n=1)[0]
    no_wd_refreshed = _steps(make_optimizer(OptimConfig(**wd, wd_mult=(("refreshed", 0.0),)), groups), trainable,
                             n=1)[0]
    nodecay = plain[0]
    flat = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    acted = set()
    for g, dm, w, x, d, n in zip(flat(groups), flat(decay_mask(groups)), flat(trainable), flat(no_wd_refreshed),
                                 flat(decayed), flat(nodecay)):
        if g == "refreshed":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(n))
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(d))
        if dm and np.any(np.asarray(w) != 0):  # (the new blocks' zeroed o_proj / down_proj have nothing to decay)
            assert not np.array_equal(np.asarray(d), np.asarray(n))  # decay acts on every nonzero decayed leaf
            acted.add(g)
    assert {"refreshed", "inserted", "embed"} <= acted


def test_multipliers_are_checked():
    from slayer_jax.errors import SlayerError

    with pytest.raises(SlayerError, match=r"optim.lr_mult.oops: unknown group"):
        OptimConfig.from_config({"peak_lr": 1e-3, "lr_mult": {"oops": 2.0}}, 10)
    with pytest.raises(SlayerError, match=r"optim.wd_mult.inserted: -1.0; expected a number >= 0"):
        OptimConfig.from_config({"wd_mult": {"inserted": -1.0}}, 10)
    c = OptimConfig.from_config({"lr_mult": {"inserted": 1.0, "refreshed": 3.0}}, 10)
    assert c.lr_mult == (("refreshed", 3.0),)  # multipliers of 1 are plain AdamW


def test_lora_starts_as_the_same_model_trains_only_adapters_and_merges_exactly():
    params = init_params(CFG, 4, jax.random.PRNGKey(0))
    plan = surgery.plan_from("lora", 4, lora_rank=4, lora_alpha=8.0)
    new, mask, lmap = surgery.apply_plan(params, plan)
    np.testing.assert_array_equal(np.asarray(forward(new, TOKENS, CFG)), np.asarray(forward(params, TOKENS, CFG)))
    for layer, m in zip(new["layers"], mask["layers"]):
        for name in surgery.PROJECTIONS:
            assert layer[name]["lora_a"].shape == (layer[name]["kernel"].shape[0], 4)
            assert layer[name]["lora_b"].shape == (4, layer[name]["kernel"].shape[1])
            assert float(layer[name]["lora_scale"]) == 2.0
            assert m[name] == {"kernel": False, "bias": False, "lora_a": True, "lora_b": True, "lora_scale": False}
    assert all(r["kind"] == "original" and not r["trainable"] and r["adapter"] == 4 for r in lmap)
    assert not any(jax.tree_util.tree_leaves(mask["embed"]))
    # trained adapters: the merged model computes what the adapted one does
    key = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    trained = dict(new, layers=[{n: (dict(p, lora_b=0.1 * jax.random.normal(next(key), p["lora_b"].shape))
                                     if n in surgery.PROJECTIONS else p) for n, p in layer.items()}
                                for layer in new["layers"]])
    merged = merge_adapters(trained)
    assert "lora_a" not in merged["layers"][0]["q_proj"]
    out = np.asarray(forward(trained, TOKENS, CFG))
    assert np.abs(out - np.asarray(forward(new, TOKENS, CFG))).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(np.asarray(forward(merged, TOKENS, CFG)), out, atol=2e-5)
    # by hand for one projection: kernel + scale * A @ B
    p = trained["layers"][1]["up_proj"]
    np.testing.assert_allclose(np.asarray(merged["layers"][1]["up_proj"]["kernel"]),
                               np.asarray(p["kernel"]) + 2.0 * np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"]),
                               rtol=1e-5, atol=1e-6)


def test_lora_plan_is_checked_and_round_trips_through_json():
    with pytest.raises(ValueError, match="lora_rank"):
        surgery.plan_from("lora", 4, lora_rank=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        surgery.Plan(4, lora_rank=2, lora_alpha=-1.0)
    plan = surgery.plan_from("shallow", 8, expand=2, lora_rank=2)
    assert surgery.Plan.from_json(json.loads(plan.dumps())) == plan
    with pytest.raises(ValueError, match="lora_rank"):
        surgery.Plan.from_json(dict(plan.to_json(), lora_rank="2"))


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_exports_a_plain_hf_model(tmp_path, smollm2_dir):
    """`slayer train` with plan.kind=lora: the frozen kernels never move, the export is the merged
    model (transformers loads it: no adapter tensors), and its logits are our adapted model's."""
    import torch
    from tiny_tok import make_smollm2_tiny_run
    from transformers import AutoModelForCausalLM

    from slayer_jax.io.hf import load_hf
    from slayer_jax.training.configs import load_config_file
    from slayer_jax.training.train import run

    work = make_smollm2_tiny_run(tmp_path, smollm2_dir)
    o = {"model": str(work / "model"), "workdir": str(work / "lora"), "export_dir": str(work / "export"),
         "steps": 4, "batch_size": 4, "num_devices": 1, "data.source": str(work / "corpus"), "data.seq_len": 64,
         "plan.kind": "lora",
         "plan.lora_rank": 4, "optim.peak_lr": 1e-2, "optim.lr_mult.adapter": 2.0, "log_every": 1,
         "eval_every": 1000, "checkpoint.every": 1000}
    cfg = load_config_file(REPO / "configs" / "smollm2_slayer.py", [f"--config.{k}={v}" for k, v in o.items()])
    out = run(cfg)
    base, _, _ = load_hf(work / "model")
    trained = out["params"]
    for b, t in zip(base["layers"], trained["layers"]):
        np.testing.assert_array_equal(np.asarray(b["q_proj"]["kernel"]), np.asarray(t["q_proj"]["kernel"]))
        assert np.abs(np.asarray(t["down_proj"]["lora_b"])).max() > 0  # trained from zeros
    np.testing.assert_array_equal(np.asarray(base["embed"]["embedding"]), np.asarray(trained["embed"]["embedding"]))
    record = json.loads((work / "export" / "config.json").read_text())["slayer"]
    assert record["plan"]["lora_rank"] == 4 and record["trainable_layers"] == []
    hf = AutoModelForCausalLM.from_pretrained(work / "export", torch_dtype=torch.float32)
    ids = np.array([[1, 400, 2000, 31, 77, 9000]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(trained, jnp.asarray(ids), out["cfg"]))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    exported, _, _ = load_hf(work / "export")
    assert "lora_a" not in exported["layers"][0]["q_proj"]
