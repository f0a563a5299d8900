"""The masked step: compiled FLOPs, optimizer-state bytes, mesh equivalence, accumulation, frozen bits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slayer_jax import surgery
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import init_params
from slayer_jax.parallel.sharding import batch_sharding, make_mesh, param_shardings
from slayer_jax.training.step import (
    OptimConfig,
    StepConfig,
    compile_step,
    init_state,
    make_optimizer,
    merge_params,
    split_params,
    train_step,
    tree_bytes,
    tree_size,
)

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16)


@pytest.fixture(scope="module")
def model():
    p = init_params(CFG, 8, jax.random.PRNGKey(0), std=0.05)
    plan = surgery.shallow(8, 2, 1, refresh_last=True)
    return surgery.apply_plan(p, plan)


def make_batch(B=8, T=32, seed=0):
    rng = np.random.RandomState(seed)
    toks = rng.randint(0, 128, (B, T + 1))
    w = (rng.rand(B, T) > 0.1).astype(np.float32)  # uneven weights: accumulation must weight by tokens
    return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32), "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "positions": jnp.asarray(np.tile(np.arange(T), (B, 1)), jnp.int32),
            "segment_ids": jnp.ones((B, T), jnp.int32), "weights": jnp.asarray(w)}


def _flops(compiled):
    ca = compiled.cost_analysis()
    return (ca if isinstance(ca, dict) else ca[0])["flops"]


def test_masked_step_flops_below_full(model):
    params, mask, _ = model
    tx = make_optimizer(OptimConfig(total_steps=10))
    batch = make_batch()
    step = jax.jit(functools.partial(train_step, sc=StepConfig(CFG), tx=tx))
    tr, fr = split_params(params, mask)
    masked = _flops(step.lower(init_state(tr, tx), fr, batch).compile())
    all_true = jax.tree_util.tree_map(lambda _: True, params)
    tr_f, fr_f = split_params(params, all_true)
    full = _flops(step.lower(init_state(tr_f, tx), fr_f, batch).compile())
    # first new block is layer 2 of 9: backward below it and frozen weight-grads must be gone
    assert masked < 0.8 * full, (masked, full)


def test_optimizer_state_only_for_trainable(model):
    params, mask, lmap = model
    tx = make_optimizer(OptimConfig(total_steps=10))
    tr, _ = split_params(params, mask)
    state = init_state(tr, tx)
    n_trainable = surgery.count_trainable(params, mask)
    assert tree_size(tr) == n_trainable
    scalars = sum(1 for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim == 0)
    # Adam: two fp32 moments per trainable parameter; frozen leaves have no state at all
    assert tree_bytes(state["opt_state"]) == n_trainable * 2 * 4 + 4 * scalars
    assert n_trainable < 0.5 * tree_size(params)


def _run(params, mask, steps, batches, mesh=None, grad_accum=1):
    tx = make_optimizer(OptimConfig(total_steps=10, warmup_frac=0.1))
    sc = StepConfig(CFG, grad_accum=grad_accum)
    tr, fr = split_params(params, mask)
    if mesh is None:
        step = compile_step(sc, tx, donate=False)
        state = init_state(tr, tx)
    else:
        tr_sh, fr_sh = param_shardings(tr, mesh), param_shardings(fr, mesh)
        tr, fr = jax.device_put(tr, tr_sh), jax.device_put(fr, fr_sh)
        state = jax.jit(functools.partial(init_state, tx=tx))(tr)
        st_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        step = compile_step(sc, tx, st_sh, fr_sh, batch_sharding(mesh), donate=False)
        batches = [jax.device_put(b, batch_sharding(mesh)) for b in batches]
    losses = []
    for b in batches[:steps]:
        state, m = step(state, fr, b)
        losses.append(float(m["loss"]))
    return losses, merge_params(jax.device_get(state["trainable"]), jax.device_get(fr))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_mesh_matches_single_device(model, shape):
    """fp32 on simulated CPU devices: the sharded step reorders reductions (psum over shards),
    so results agree to fp32 reduction-order precision, ~1e-5 relative, not bit for bit."""
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS for 8 simulated devices"
    params, mask, _ = model
    batches = [make_batch(seed=s) for s in range(3)]
    ref_losses, ref_params = _run(params, mask, 3, batches)
    losses, got = _run(params, mask, 3, batches, mesh=make_mesh(dict(zip(("data", "fsdp", "tensor"), shape))))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref_params)


def test_grad_accumulation_equals_large_batch(model):
    params, mask, _ = model
    batches = [make_batch(B=8, seed=s) for s in range(2)]
    big_losses, big = _run(params, mask, 2, batches)
    acc_losses, acc = _run(params, mask, 2, batches, grad_accum=4)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)  # same reduction-order bound as above
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), acc, big)


def test_frozen_bit_identical_and_trainable_changes(model):
    params, mask, lmap = model
    _, after = _run(params, mask, 3, [make_batch(seed=s) for s in range(3)])
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), params, after)
    assert jax.tree_util.tree_leaves(changed) == jax.tree_util.tree_leaves(mask)
