"""``slayer plan``: will this run fit, and does its step compile for the target mesh? No weights.

1. Shapes only (``jax.eval_shape``): the model from its config, the surgery plan, the
   trainable/frozen split and the optimizer state. Per-device bytes come from each leaf's
   shard shape under the role-based sharding rules (``NamedSharding.shard_shape`` on an
   abstract mesh, so no devices are needed): params, optimizer state, gradients, plus an
   *estimate* of saved activations under the remat policy, compared with the accelerator's
   memory.
2. Ahead-of-time compile of the real train step for a simulated CPU mesh with the same device
   count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by the CLI before jax
   starts), which catches sharding errors before any pod is rented.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from slayer_jax.config import ModelConfig, load_config
from slayer_jax.errors import SlayerError
from slayer_jax.sharding import AXES, param_specs, parse_mesh

# HBM per device in bytes, and chips per slice where the name fixes it.
ACCELERATORS = {
    "v5p-8": {"hbm": 95 * 2**30, "devices": 4},
    "v5e-8": {"hbm": 16 * 2**30, "devices": 8},
    "v6e-8": {"hbm": 32 * 2**30, "devices": 8},
    "h100-80gb": {"hbm": 80 * 2**30, "devices": None},
}


def model_config_of(c) -> tuple[ModelConfig, int]:
    """The model's config without weights: ``model_config`` (a known name) or ``model/config.json``."""
    from pathlib import Path

    from slayer_jax.known_models import known_config

    name = c.get("model_config", "")
    if name:
        return known_config(name)
    path = Path(str(c.model))
    if path.is_dir() and (path / "config.json").exists():
        return load_config(path)
    if str(c.model) == "default":
        return known_config("smollm2_135m")
    raise SlayerError(f"config: field 'model_config' is empty and {c.model} has no local config.json; "
                      f"set --config.model_config to a known model")


def abstract_run(c, num_layers: int | None = None):
    """Shapes of (trainable, frozen, mask, layer_map, cfg) for config ``c``, without weights."""
    from slayer_jax import surgery
    from slayer_jax.model import expected_shapes
    from slayer_jax.train import build_plan, split_params

    cfg, L = model_config_of(c)
    pc = c.plan
    if num_layers is not None and num_layers != L:  # same plan shape on a shallower model
        pc = ml_collections.ConfigDict(c.plan.to_dict())
        if pc.kind in ("shallow", "uniform"):
            pc.expand = max(1, pc.expand * num_layers // L)
            pc.prune = (max(1, pc.prune * num_layers // L) if pc.prune else 0)
            pc.prune_layers = ()
        L = num_layers
    abstract = expected_shapes(cfg, L)
    plan = build_plan(pc, L)
    if plan is not None:
        lmap = surgery.layer_map(plan)
        abstract = jax.eval_shape(lambda p: surgery.apply_plan(p, plan)[0], abstract)
    else:
        lmap = [{"index": i, "kind": "original", "from": [i], "trainable": True} for i in range(L)]
    full = bool(c.get("full_finetune", False)) or plan is None
    mask = surgery.trainable_mask(abstract, [True if full else r["trainable"] for r in lmap],
                                  train_embed=full, train_norm=full, train_head=full)
    trainable, frozen = split_params(abstract, mask)
    fdt = c.get("frozen_dtype", "") or None
    if fdt:
        from slayer_jax.model import as_dtype

        frozen = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, as_dtype(fdt)), frozen)
    return trainable, frozen, mask, lmap, cfg


def _abstract_mesh(shape: dict[str, int]) -> AbstractMesh:
    sizes = tuple(shape[a] for a in AXES)
    try:
        return AbstractMesh(sizes, AXES)
    except TypeError:  # older jax: AbstractMesh(((name, size), ...))
        return AbstractMesh(tuple(zip(AXES, sizes)))


def sharded_bytes(tree: Any, specs: Any, mesh) -> int:
    """Bytes one device holds: the product of each leaf's shard shape times its itemsize."""
    total = 0
    for x, spec in zip(jax.tree_util.tree_leaves(tree),
                       jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        shard = NamedSharding(mesh, spec).shard_shape(tuple(x.shape))
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def opt_state_specs(opt_state: Any, trainable: Any, trainable_specs: Any) -> Any:
    """Adam's moments mirror the trainable tree: give each moment leaf its parameter's spec
    (matched by key path suffix), scalars (counts) replicated."""
    by_path = {}
    for (path, _), spec in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                               jax.tree_util.tree_leaves(trainable_specs, is_leaf=lambda s: isinstance(s, P))):
        by_path[jax.tree_util.keystr(path)] = spec

    def pick(path, x):
        s = jax.tree_util.keystr(path)
        for p, spec in by_path.items():
            if s.endswith(p):
                return spec
        if x.ndim:
            raise SlayerError(f"sharding: optimizer leaf {s} matches no parameter")
        return P()

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def activation_bytes(cfg: ModelConfig, lmap: list, tokens_per_device: int, remat: str, compute_bytes: int,
                     tensor: int) -> int:
    """Estimate of activations kept for the backward pass on one device (an estimate, not XLA's
    number). Only layers at or above the lowest trainable layer keep anything: below it no
    gradient flows. Per kept layer: remat 'full' keeps the block input; 'save_dots' also the
    outputs of its matmuls; 'none' also norms, activations and the fp32 attention probabilities.
    The fp32 logits and their gradient are added once."""
    trainable = [r["index"] for r in lmap if r["trainable"]]
    kept = len(lmap) - (min(trainable) if trainable else len(lmap))
    d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim)
    t = tokens_per_device
    block_in = t * d * compute_bytes
    dots = t * (h * hd + 2 * k * hd + d + 2 * f + d) * compute_bytes // tensor
    if remat == "full":
        per_layer = block_in
    elif remat == "save_dots":
        per_layer = block_in + dots
    else:
        seq = min(t, 4096)
        probs = (t // seq) * h * seq * seq * 4 // tensor
        per_layer = block_in * 4 + dots + t * f * compute_bytes // tensor + probs
    logits = 2 * t * cfg.vocab_size * 4 // tensor
    # a remat'ed block recomputes one layer at a time: add one un-remat'ed layer of working set
    working = block_in * 4 + dots + t * f * compute_bytes // tensor
    return kept * per_layer + logits + working


def plan_memory(c, mesh_spec: str, device: str, num_layers: int | None = None) -> dict[str, Any]:
    from slayer_jax.train import OptimConfig, init_state, make_optimizer

    if device not in ACCELERATORS:
        raise SlayerError(f"--device: {device!r} is not one of {sorted(ACCELERATORS)}")
    shape = parse_mesh(mesh_spec)
    if any(v < 1 for v in shape.values()):
        raise SlayerError(f"--mesh: {mesh_spec!r}: every axis needs an explicit size >= 1 for planning")
    n_dev = math.prod(shape.values())
    want = ACCELERATORS[device]["devices"]
    if want is not None and want != n_dev:
        raise SlayerError(f"--mesh: {mesh_spec} has {n_dev} devices but a {device} slice has {want}")
    mesh = _abstract_mesh(shape)
    tr, fr, mask, lmap, cfg = abstract_run(c, num_layers)
    tr_specs, fr_specs = param_specs(tr, mesh), param_specs(fr, mesh)
    tx = make_optimizer(OptimConfig(total_steps=int(c.steps)))
    state = jax.eval_shape(functools.partial(init_state, tx=tx), tr)
    opt_specs = opt_state_specs(state["opt_state"], tr, tr_specs)
    dp = shape["data"] * shape["fsdp"]
    accum = int(c.get("grad_accum", 1))
    if int(c.batch_size) % (dp * accum):
        raise SlayerError(f"config: batch_size {c.batch_size} is not divisible by data*fsdp ({dp}) x grad_accum "
                          f"({accum})")
    tokens = int(c.batch_size) // dp // accum * int(c.data.seq_len)
    compute_bytes = 2 if c.dtype in ("bfloat16", "bf16", "float16") else 4
    out = {
        "device": device, "mesh": shape, "num_devices": n_dev, "num_layers": len(lmap),
        "trainable_layers": [r["index"] for r in lmap if r["trainable"]],
        "params_total": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves((tr, fr)))),
        "params_trainable": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tr))),
        "bytes": {
            "params": sharded_bytes(tr, tr_specs, mesh) + sharded_bytes(fr, fr_specs, mesh),
            "optimizer": sharded_bytes(state["opt_state"], opt_specs, mesh),
            "gradients": sharded_bytes(tr, tr_specs, mesh),
            "activations_estimate": activation_bytes(cfg, lmap, tokens, c.get("remat", "none") or "none",
                                                     compute_bytes, shape["tensor"]),
        },
        "hbm_per_device": ACCELERATORS[device]["hbm"],
        "specs": {"trainable": tr_specs, "frozen": fr_specs, "opt_state": opt_specs},
        "abstract": {"trainable": tr, "frozen": fr, "opt_state": state["opt_state"]},
    }
    out["bytes"]["total"] = sum(out["bytes"].values())
    out["fits"] = out["bytes"]["total"] <= out["hbm_per_device"]
    return out


def compile_for_mesh(c, mesh_spec: str, num_layers: int | None = None) -> dict[str, Any]:
    """Lower and compile the real train step for a CPU mesh of the same shape (needs that many
    CPU devices: the CLI sets XLA_FLAGS before jax starts)."""
    from slayer_jax.sharding import batch_sharding, make_mesh, param_shardings
    from slayer_jax.train import OptimConfig, StepConfig, init_state, make_optimizer, train_step

    shape = parse_mesh(mesh_spec)
    n = math.prod(shape.values())
    if jax.device_count() < n:
        raise SlayerError(f"--mesh: needs {n} devices but jax sees {jax.device_count()}; run with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (slayer plan sets it itself)")
    mesh = make_mesh(shape, devices=jax.devices()[:n])
    tr, fr, mask, lmap, cfg = abstract_run(c, num_layers)
    tr_sh, fr_sh = param_shardings(tr, mesh), param_shardings(fr, mesh)
    tx = make_optimizer(OptimConfig(total_steps=int(c.steps)))
    state_abs = jax.eval_shape(functools.partial(init_state, tx=tx), tr)
    opt_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s),
                                    opt_state_specs(state_abs["opt_state"], tr, param_specs(tr, mesh)),
                                    is_leaf=lambda s: isinstance(s, P))
    rep = NamedSharding(mesh, P())
    st_sh = {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}
    b_sh = batch_sharding(mesh)
    B, T = int(c.batch_size), int(c.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "weights" else jnp.int32, sharding=b_sh)
             for k in ("inputs", "targets", "positions", "segment_ids", "weights")}
    with_sh = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    sc = StepConfig(cfg, dtype=c.dtype, remat=(c.get("remat", None) or None), grad_accum=int(c.get("grad_accum", 1)))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    step = jax.jit(functools.partial(train_step, sc=sc, tx=tx, act_sharding=act),
                   in_shardings=(st_sh, fr_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(with_sh(state_abs, st_sh), with_sh(fr, fr_sh), batch)
    compiled = lowered.compile()
    info = {"compile_s": time.perf_counter() - t0, "num_layers": len(lmap), "num_devices": n}
    try:
        ma = compiled.memory_analysis()
        info["xla_cpu_memory"] = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                   "temp_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # not every backend reports it
        pass
    ca = compiled.cost_analysis()
    info["flops_per_device"] = float((ca if isinstance(ca, dict) else ca[0]).get("flops", float("nan")))
    return info


def format_plan(report: dict[str, Any]) -> str:
    gb = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    b = report["bytes"]
    lines = [f"device {report['device']} x{report['num_devices']}, mesh {report['mesh']}, "
             f"{report['num_layers']} layers, trainable layers {report['trainable_layers']}",
             f"parameters: {report['params_total']:,} total, {report['params_trainable']:,} trainable "
             f"({100 * report['params_trainable'] / report['params_total']:.1f}%)",
             "per device:"]
    for k in ("params", "optimizer", "gradients", "activations_estimate", "total"):
        lines.append(f"  {k:<22}{gb(b[k])}")
    lines.append(f"  {'HBM':<22}{gb(report['hbm_per_device'])}  -> {'fits' if report['fits'] else 'DOES NOT FIT'}")
    return "\n".join(lines)
