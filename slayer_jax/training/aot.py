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
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import topologies
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from slayer_jax import surgery
from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import ModelConfig, load_config
from slayer_jax.modeling.known_models import known_config
from slayer_jax.modeling.model import expected_shapes
from slayer_jax.parallel.sharding import AXES, make_mesh, opt_state_specs, param_specs, parse_mesh
from slayer_jax.training.step import (
    OptimConfig,
    build_step,
    flops_per_token,
    hlo_fingerprint,
    init_state,
    make_optimizer,
    split_params,
)
from slayer_jax.training.train import build_plan

# Per chip: HBM, dense bf16 peak FLOP/s. TPU names are gcloud accelerator types: v4-N and v5p-N
# count TensorCores (2 per chip), v5litepod-N and v6e-N count chips. GPUs: one device each.
TPU_GENERATIONS = {
    "v4": {"topology": "v4", "dims": 3, "cores_per_chip": 2, "hbm": 32 * 2**30, "peak": 275e12},
    "v5p": {"topology": "v5p", "dims": 3, "cores_per_chip": 2, "hbm": 95 * 2**30, "peak": 459e12},
    "v5litepod": {"topology": "v5e", "dims": 2, "cores_per_chip": 1, "hbm": 16 * 2**30, "peak": 197e12},
    "v5e": {"topology": "v5e", "dims": 2, "cores_per_chip": 1, "hbm": 16 * 2**30, "peak": 197e12},
    "v6e": {"topology": "v6e", "dims": 2, "cores_per_chip": 1, "hbm": 32 * 2**30, "peak": 918e12},
}
GPUS = {"h100-80gb": {"hbm": 80 * 2**30, "peak": 989e12}, "h200": {"hbm": 141 * 2**30, "peak": 989e12},
        "a100-80gb": {"hbm": 80 * 2**30, "peak": 312e12}}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def accelerator(device: str) -> dict[str, Any]:
    """``--device`` -> {name, kind (tpu|gpu), chips (None: from the mesh), hbm, peak, topology...}."""
    name = device.strip().lower()
    if name in GPUS:
        return {"name": name, "kind": "gpu", "chips": None, **GPUS[name]}
    gen, _, count = name.rpartition("-")
    if gen in TPU_GENERATIONS and count.isdigit():
        g = TPU_GENERATIONS[gen]
        chips = int(count) // g["cores_per_chip"]
        shapes = _TOPOLOGY_3D if g["dims"] == 3 else _TOPOLOGY_2D
        if chips in shapes and int(count) % g["cores_per_chip"] == 0:
            single_host = g["dims"] == 2 and chips <= 8
            return {"name": name, "kind": "tpu", "chips": chips, "hbm": g["hbm"], "peak": g["peak"],
                    "topology": f"{g['topology']}:{shapes[chips]}",
                    "chips_per_host_bounds": ((2, 4, 1) if chips == 8 else (2, 2, 1) if chips == 4 else (1, 1, 1))
                    if single_host else (2, 2, 1),
                    "chip_config": "megacore" if g["dims"] == 3 else "default"}
        sizes = sorted(k * g["cores_per_chip"] for k in shapes)
        raise SlayerError(f"--device: {device!r}: a {gen} slice has {', '.join(map(str, sizes))} in its name")
    raise SlayerError(f"--device: {device!r}; expected a TPU type (v4-N, v5p-N, v5litepod-N, v6e-N) or a GPU "
                      f"({', '.join(GPUS)})")


def tpu_devices(acc: dict[str, Any]) -> list:
    """The devices of a TPU slice for ahead-of-time compilation on any machine (libtpu's deviceless
    topology), or a SlayerError when libtpu is not installed."""

    if importlib.util.find_spec("libtpu") is None:
        raise SlayerError("libtpu is not installed; `pip install slayer_jax[tpu]` compiles for real TPU topologies")

    # a deviceless compile touches no chip: let several processes (plans, tests) load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    topo = topologies.get_topology_desc(platform="tpu", topology_name=acc["topology"],
                                        chip_config_name=acc["chip_config"],
                                        chips_per_host_bounds=acc["chips_per_host_bounds"], num_slices=1)
    return list(topo.devices)


def model_config_of(c) -> tuple[ModelConfig, int]:
    """The model's config without weights: ``model/config.json`` when the model is a local
    directory, else ``model_config`` (a known name)."""

    path = Path(str(c.model))
    if path.is_dir() and (path / "config.json").exists():  # the model's own config wins: it is what trains
        return load_config(path)
    name = c.get("model_config", "")
    if name:
        return known_config(name)
    if str(c.model) == "default":
        return known_config("smollm2_135m")
    raise SlayerError(f"config: field 'model_config' is empty and {c.model} has no local config.json; "
                      f"set --config.model_config to a known model")


def abstract_run(c, num_layers: int | None = None):
    """Shapes of (trainable, frozen, mask, layer_map, cfg) for config ``c``, without weights."""

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
    record = surgery.read_record(c.model) if pc.get("kind") == "from_model" else None
    abstract = jax.eval_shape(lambda p: surgery.prepare_for_training(p, plan, record=record)[0], abstract)
    mask, lmap = surgery.training_mask(abstract, plan, record=record, full_finetune=bool(c.get("full_finetune", False)))
    trainable, frozen = split_params(abstract, mask)
    fdt = c.get("frozen_dtype", "") or None
    if fdt:
        from slayer_jax.modeling.model import as_dtype

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


def activation_bytes(cfg: ModelConfig, lmap: list, rows: int, seq_len: int, remat: str, compute_bytes: int,
                     tensor: int, attention: str = "xla", loss_chunk: int = 0) -> dict[str, int]:
    """Estimate, per device and microbatch of ``rows`` sequences, of what the backward pass keeps
    and what the step needs at its peak (an estimate, not XLA's number; ``slayer plan`` prints the
    compiler's beside it on TPU targets):

    - ``activations``: per layer at or above the lowest trainable one (no gradient flows below
      it): remat ``full`` keeps the block input; ``save_dots`` also its matmul outputs; ``none``
      also norms, the MLP activation and, with ``xla`` attention, the fp32 probabilities;
    - ``working``: one layer recomputed at a time: its activations, and with ``xla`` attention its
      [T, T] fp32 scores and probabilities (splash keeps per-token statistics only);
    - ``loss``: fp32 logits and their gradient, [tokens, V], or one vocabulary chunk of them plus the
      fp32 hidden-state gradient when the loss is chunked (``loss_chunk`` > 0).

    Checked against the TPU compiler's own count on small configs (tests/test_scale.py): within
    25% with splash attention and the chunked or full loss, remat full or none, fp32 or bf16,
    with or without accumulation. With ``xla`` attention at short sequences it overestimates:
    the TPU compiler fuses the [T, T] scores away there."""
    trainable = [r["index"] for r in lmap if r["trainable"]]
    kept = len(lmap) - (min(trainable) if trainable else len(lmap))
    d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim)
    t = rows * seq_len
    block_in = t * d * compute_bytes
    dots = t * (h * hd + 2 * k * hd + d + 2 * f + d) * compute_bytes // tensor
    scores = 2 * rows * (h // max(1, min(tensor, h))) * seq_len * seq_len * 4 if attention == "xla" else \
        rows * h * seq_len * 128 * 4 // tensor  # splash: its logsumexp residual, [H, T, 128] fp32
    if remat == "full":
        per_layer = block_in
    elif remat == "save_dots":
        per_layer = block_in + dots
    else:
        per_layer = block_in * 4 + dots + t * f * compute_bytes // tensor + (scores // 2 if attention == "xla" else 0)
    working = block_in * 4 + dots + t * f * compute_bytes // tensor + scores
    V = cfg.vocab_size
    # chunked: one fp32 [tokens, chunk] block and the fp32 hidden-state gradient; full logits: the
    # fp32 logits and half as much again for their softmax/gradient (what XLA keeps after fusion)
    loss = t * min(loss_chunk, V) * 4 + t * d * 4 if loss_chunk else 3 * t * V * 4 // 2 // tensor
    return {"activations": kept * per_layer, "working": working, "loss": loss}


def mesh_for(mesh_spec: str | None, acc: dict[str, Any]) -> dict[str, int]:
    """The mesh shape for a plan: ``mesh_spec`` (one axis may be -1 on a TPU slice, whose chip
    count is known), or all chips on ``fsdp`` when it is empty."""
    spec = mesh_spec or ("fsdp=-1" if acc["chips"] else "")
    if not spec:
        raise SlayerError(f"--mesh: needed for {acc['name']} (how many GPUs): e.g. data=1,fsdp=8,tensor=1")
    shape = parse_mesh(spec)
    free = [a for a, v in shape.items() if v == -1]
    if free and acc["chips"]:
        known = math.prod(v for v in shape.values() if v != -1)
        if len(free) > 1 or acc["chips"] % known:
            raise SlayerError(f"--mesh: {spec} does not divide the {acc['chips']} chips of a {acc['name']}")
        shape[free[0]] = acc["chips"] // known
    if any(v < 1 for v in shape.values()):
        raise SlayerError(f"--mesh: {spec!r}: every axis needs an explicit size >= 1 for planning")
    n = math.prod(shape.values())
    if acc["chips"] is not None and acc["chips"] != n:
        raise SlayerError(f"--mesh: {spec} has {n} devices but a {acc['name']} slice has {acc['chips']} chips")
    return shape


def plan_memory(c, mesh_spec: str, device: str, num_layers: int | None = None) -> dict[str, Any]:

    acc = accelerator(device)
    shape = mesh_for(mesh_spec, acc)
    n_dev = math.prod(shape.values())
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
        },
        "hbm_per_device": acc["hbm"],
        "specs": {"trainable": tr_specs, "frozen": fr_specs, "opt_state": opt_specs},
        "abstract": {"trainable": tr, "frozen": fr, "opt_state": state["opt_state"]},
    }
    # the estimate: what the analytic count can see, each term named
    attention = c.get("attention", "auto") or "auto"
    if attention == "auto":
        attention = "splash" if acc["kind"] == "tpu" and int(c.data.seq_len) % 128 == 0 else "xla"
    rows = int(c.batch_size) // dp // accum
    act = activation_bytes(cfg, lmap, rows, int(c.data.seq_len), c.get("remat", "none") or "none", compute_bytes,
                           shape["tensor"], attention, int(c.get("loss_chunk", 0) or 0))
    out["bytes"]["activations_estimate"] = act["activations"]
    out["bytes"]["working_estimate"] = act["working"] + act["loss"]
    if accum > 1:  # the summed gradient of the accumulation loop, beside the microbatch's own
        out["bytes"]["grad_accumulator"] = out["bytes"]["gradients"]
    if shape["fsdp"] > 1:  # one layer's weights all-gathered for compute, forward and backward
        d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim)
        per_layer = d * h * hd * 2 + 2 * d * k * hd + 3 * d * f + 2 * d
        out["bytes"]["gathered_weights_estimate"] = per_layer * compute_bytes // shape["tensor"]
    out["estimate_basis"] = {"attention": attention, "loss_chunk": int(c.get("loss_chunk", 0) or 0),
                             "rows_per_device": rows, "grad_accum": accum}
    out["bytes"]["total"] = sum(out["bytes"].values())
    out["fits"] = out["bytes"]["total"] <= out["hbm_per_device"]
    if shape["fsdp"] > 1 and acc["kind"] == "tpu":
        out["collective_matmul_bound"] = collective_matmul_bytes(cfg, lmap, rows, int(c.data.seq_len), compute_bytes,
                                                                 shape["tensor"])
        out["fits_with_collective_matmuls"] = out["bytes"]["total"] + out["collective_matmul_bound"] <= acc["hbm"]
    return out


def collective_matmul_bytes(cfg: ModelConfig, lmap: list, rows: int, seq_len: int, compute_bytes: int,
                            tensor: int) -> int:
    """What the TPU compiler adds, per device, when it turns the FSDP all-gather + matmul of every
    layer's input-side projections (q, k, v, gate, up) into collective matmuls (XLA's windowed
    einsum): it allocates each such matmul's output buffer (``AllocateBuffer``) at the start of
    the forward pass, so one [tokens, q + k + v + 2 x intermediate] buffer per layer is live at
    once. Not in the estimate's total: whether the compiler does this is its own cost-model
    decision per target (seen on a v5litepod-16, where the compiler's peak was the estimate plus
    this term, 36 of the 38 layers' worth; not on a v5p-8, which uses no windowed einsum). A bound:
    one buffer set per layer."""
    width = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim + 2 * cfg.intermediate_size
    return len(lmap) * rows * seq_len * width * compute_bytes // tensor


def compile_plan(c, mesh_spec: str | None, device: str, num_layers: int | None = None,
                 target: str = "auto") -> dict[str, Any]:
    """Lower and compile the step ``slayer train`` runs (:func:`slayer_jax.training.step.build_step`) for the
    target's devices, and report the compiler's own figures.

    ``target``: ``tpu`` compiles for the real TPU topology of ``device`` through libtpu's deviceless
    compilation (any machine); ``cpu`` for a simulated CPU mesh of the same device count (the CLI
    sets XLA_FLAGS before jax starts); ``auto``: tpu when ``device`` is a TPU and libtpu is
    installed, else cpu. Figures are the compiler's estimates, not measurements: per-device bytes
    (arguments, temporaries, outputs), FLOPs, and for TPUs ``optimal_seconds`` and the MFU it implies."""

    acc = accelerator(device)
    shape = mesh_for(mesh_spec, acc)
    n = math.prod(shape.values())
    if target == "auto":
        target = "tpu" if acc["kind"] == "tpu" and importlib.util.find_spec("libtpu") is not None else "cpu"
    if target == "tpu":
        devices = tpu_devices(acc)
    else:
        if jax.device_count() < n:
            raise SlayerError(f"--mesh: needs {n} devices but jax sees {jax.device_count()}; run with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (slayer plan sets it itself)")
        devices = jax.devices()[:n]
    mesh = make_mesh(shape, devices=devices)
    tr, fr, mask, lmap, cfg = abstract_run(c, num_layers)
    program = build_step(c, cfg, mesh, tr, fr, int(c.steps), layer_kinds=[r["kind"] for r in lmap])
    B, T = int(c.batch_size), int(c.data.seq_len)
    t0 = time.perf_counter()
    lowered = program.lower(tr, fr, B, T)
    compiled = lowered.compile()
    info = {"target": target, "device": acc["name"], "compile_s": time.perf_counter() - t0, "num_layers": len(lmap),
            "num_devices": n, "mesh": shape, "hlo_fingerprint": hlo_fingerprint(lowered),
            "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "") if target == "tpu" else ""}
    ma = compiled.memory_analysis()
    if ma is not None:
        mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
        mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
        info["memory"] = mem
        info["hbm"] = acc["hbm"]
        info["fits"] = mem["total"] <= acc["hbm"]
    ca = compiled.cost_analysis()
    ca = ca if isinstance(ca, dict) else (ca[0] if ca else {})
    # XLA's cost analysis counts a loop body once: the gradient-accumulation scan runs it grad_accum
    # times (checked: the same FLOPs at grad_accum 1, 2 and 4 for 1, 2 and 4 microbatches).
    accum = int(c.get("grad_accum", 1))
    info["grad_accum"] = accum
    info["scanned_runs"] = [list(r) for r in getattr(program.step, "runs", ())]
    if info["scanned_runs"]:  # a scanned run's body is counted once too: not a per-step figure
        info["flops_undercounted"] = True
    info["flops_per_device"] = float(ca.get("flops", float("nan"))) * accum
    secs = float(ca.get("optimal_seconds", float("nan"))) * accum
    trainable = [r["index"] for r in lmap if r["trainable"]]
    full = bool(c.get("full_finetune", False)) or c.plan.kind == "none"
    fpt = flops_per_token(cfg, len(lmap), T, None if full else min(trainable), len(trainable),
                          bool(c.plan.get("train_head", False)) or full)
    info["model_flops_per_device"] = {k: v * B * T / n for k, v in fpt.items()}
    if target == "tpu" and secs > 0 and not info.get("flops_undercounted"):
        info["optimal_seconds"] = secs
        info["mfu_estimate"] = {k: v / (secs * acc["peak"]) for k, v in info["model_flops_per_device"].items()}
    elif target == "tpu":
        info["optimal_seconds_unusable"] = secs  # the compiler returned a non-positive estimate
    return info


def compile_for_mesh(c, mesh_spec: str, num_layers: int | None = None) -> dict[str, Any]:
    """:func:`compile_plan` for a simulated CPU mesh (kept for callers that name no device)."""
    return compile_plan(c, mesh_spec, "h100-80gb", num_layers, target="cpu")


def format_compile(info: dict[str, Any]) -> str:
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    where = (f"the TPU compiler (libtpu, deviceless) for a {info['device']} ({info['num_devices']} chips)"
             if info["target"] == "tpu" else f"a simulated {info['num_devices']}-device CPU mesh")
    lines = [f"compiled the train step ({info['num_layers']} layers, mesh {info['mesh']}) for {where} in "
             f"{info['compile_s']:.1f} s: sharding is consistent"]
    if info.get("libtpu_init_args"):
        lines.append(f"  TPU compiler flags (LIBTPU_INIT_ARGS): {info['libtpu_init_args']}")
    if info["target"] != "tpu":
        lines.append("  (no TPU compile: libtpu is not installed, or the device is a GPU; the figures below are XLA:CPU's, "
                     "not the accelerator's)")
    m = info.get("memory")
    if m:
        lines.append(f"  compiler's estimate per device: arguments {gb(m['argument'])}, temporaries {gb(m['temp'])}, "
                     f"outputs {gb(m['output'])} (aliased {gb(m['alias'])}), total {gb(m['total'])}"
                     + (f" of {gb(info['hbm'])} HBM -> {'fits' if info['fits'] else 'DOES NOT FIT'}"
                        if info["target"] == "tpu" else ""))
    lines.append(f"  compiler's FLOPs per device per step: {info['flops_per_device'] / 1e12:.2f} TFLOP "
                 + (f"({info['grad_accum']} microbatches x the loop body's count) " if info.get("grad_accum", 1) > 1 else "")
                 + f"(model: {info['model_flops_per_device']['full'] / 1e12:.2f} full-model, "
                 f"{info['model_flops_per_device']['masked'] / 1e12:.2f} masked work)")
    if "optimal_seconds" in info:
        mfu = info["mfu_estimate"]
        lines.append(f"  compiler's roofline step time (optimal_seconds) {info['optimal_seconds']:.3f} s -> estimated MFU "
                     f"{mfu['full']:.0%} counting full-model FLOPs, {mfu['masked']:.0%} counting the masked work")
    elif info.get("flops_undercounted"):
        lines.append(f"  scan_layers: the compiler counts each scanned run of layers {info['scanned_runs']} once, so its "
                     f"FLOPs and optimal_seconds are not per-step figures: no MFU estimate (plan with "
                     f"--config.scan_layers=False for them)")
    elif "optimal_seconds_unusable" in info:
        lines.append(f"  the compiler's optimal_seconds is unusable here ({info['optimal_seconds_unusable']:.3g}): "
                     f"no MFU estimate")
    return "\n".join(lines)


def format_plan(report: dict[str, Any]) -> str:
    gb = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    b = report["bytes"]
    lines = [f"device {report['device']} x{report['num_devices']}, mesh {report['mesh']}, "
             f"{report['num_layers']} layers, trainable layers {report['trainable_layers']}",
             f"parameters: {report['params_total']:,} total, {report['params_trainable']:,} trainable "
             f"({100 * report['params_trainable'] / report['params_total']:.1f}%)",
             "per device:"]
    for k in [k for k in b if k != "total"] + ["total"]:
        lines.append(f"  {k:<26}{gb(b[k])}")
    lines.append(f"  {'HBM':<26}{gb(report['hbm_per_device'])}  -> {'fits' if report['fits'] else 'DOES NOT FIT'}")
    if "collective_matmul_bound" in report:
        cm = report["collective_matmul_bound"]
        lines.append(f"  {'+ collective matmuls':<26}{gb(cm)}  (at most, where the TPU compiler makes every layer's "
                     f"FSDP matmuls windowed einsums, as on v5e: total {gb(b['total'] + cm).strip()} -> "
                     + ("fits either way)" if report["fits_with_collective_matmuls"] else
                        "MAY NOT FIT: only the TPU compile can tell)" if report["fits"] else "does not fit either)"))
    return "\n".join(lines)
