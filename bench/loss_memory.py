"""Per-chip temporaries and FLOPs of the training loss + its gradient, plain vs vocabulary-chunked.

Deviceless TPU compile (v5p-8 = v5p:2x2x1, 4 chips, mesh data=1,fsdp=4,tensor=1 as in
bench/memory_table.py): the loss is ``slayer_jax.modeling.loss.loss_sums_from_hidden`` (final RMSNorm,
head matmul, NLL, weights) differentiated w.r.t. the last hidden state [B, T, D] bf16 and the
fp32 master params {norm, lm_head} (untied, as Llama-2/3), bf16 compute. Figures are the
compiler's estimates (``memory_analysis().temp_size_in_bytes``, ``cost_analysis()["flops"]``)
for one chip.

    PYTHONPATH=/tmp/libtpu_site JAX_PLATFORMS=cpu python bench/loss_memory.py [--chunks 4096,8192]

(``PYTHONPATH`` points at an unpacked libtpu when it is not installed; add
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` when another process holds /tmp/libtpu_lockfile.)
FLOPs of the chunked loss come from a fully unrolled twin of the program (XLA's cost analysis
counts a while-loop body once); temporaries from the real, rolled program.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import slayer_jax.modeling.loss as loss_mod
from slayer_jax.modeling.loss import loss_sums_from_hidden

MODELS = [("Llama-2 (V=32000)", 32000), ("Llama-3 (V=128256)", 128256)]
D, T = 4096, 4096


def v5p8_mesh() -> Mesh:
    from slayer_jax.parallel.sharding import make_mesh
    from slayer_jax.training.aot import accelerator, tpu_devices

    return make_mesh("fsdp=4", devices=tpu_devices(accelerator("v5p-8")))


def compile_loss_grad(mesh: Mesh, V: int, rows_per_chip: int, chunk: int | None, *, d: int = D, t: int = T,
                      tied: bool = False):
    """The compiled loss+grad (per-chip program) for a global batch of rows_per_chip * n_chips rows."""
    n = mesh.devices.size
    B = rows_per_chip * n
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    cfg = types.SimpleNamespace(rms_norm_eps=1e-5)
    params = {"norm": {"scale": jax.ShapeDtypeStruct((d,), jnp.float32, sharding=NamedSharding(mesh, P(None)))}}
    if tied:  # sharding.RULES: embed [V, D] ("tensor", "fsdp"); lm_head [D, V] ("fsdp", "tensor")
        params["embed"] = {"embedding": jax.ShapeDtypeStruct((V, d), jnp.float32,
                                                             sharding=NamedSharding(mesh, P("tensor", "fsdp")))}
    else:
        params["lm_head"] = {"kernel": jax.ShapeDtypeStruct((d, V), jnp.float32,
                                                            sharding=NamedSharding(mesh, P("fsdp", "tensor")))}
    hidden = jax.ShapeDtypeStruct((B, t, d), jnp.bfloat16, sharding=act)
    targets = jax.ShapeDtypeStruct((B, t), jnp.int32, sharding=batch)
    weights = jax.ShapeDtypeStruct((B, t), jnp.float32, sharding=batch)

    def loss(h, p, y, w):
        s, ws = loss_sums_from_hidden(h, p, cfg, y, w, jnp.bfloat16, chunk=chunk)
        return s / jnp.maximum(ws, 1.0)

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    shard_of = lambda x: x.sharding
    out_sh = (NamedSharding(mesh, P()), (act, jax.tree_util.tree_map(shard_of, params)))
    return jax.jit(fn, out_shardings=out_sh).lower(hidden, params, targets, weights).compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def measure(mesh, V, rows, chunk, *, flops: bool = True, **kw) -> dict:
    """temp bytes of the real (rolled-loop) program; FLOPs of a fully unrolled twin, since XLA's
    cost analysis counts a while-loop body once."""
    t0 = time.time()
    c = compile_loss_grad(mesh, V, rows, chunk, **kw)
    out = {"temp": c.memory_analysis().temp_size_in_bytes, "flops": _flops(c)}
    if flops and chunk is not None and chunk < V:
        loss_mod._UNROLL = True
        try:
            out["flops"] = _flops(compile_loss_grad(mesh, V, rows, chunk, **kw))
        finally:
            loss_mod._UNROLL = 1
    out["compile_s"] = time.time() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="4096,8192", help="comma-separated vocabulary chunk sizes")
    ap.add_argument("--rows", default="1,4", help="comma-separated rows (of T=4096) per chip")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    mesh = v5p8_mesh()
    gib = lambda b: f"{b / 2**30:.2f}"
    print("| model | rows/chip | tokens/chip | loss | temp GiB/chip | TFLOP/chip | FLOPs vs plain | 6NDV, 8NDV (TFLOP) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, V in MODELS:
        for rows in (int(r) for r in args.rows.split(",")):
            N = rows * T
            base = measure(mesh, V, rows, None)
            ref = f"{6 * N * D * V / 1e12:.1f}, {8 * N * D * V / 1e12:.1f}"
            print(f"| {name} | {rows} | {N} | plain | {gib(base['temp'])} | {base['flops'] / 1e12:.2f} | 1.00 | {ref} |",
                  flush=True)
            for ch in chunks:
                r = measure(mesh, V, rows, ch)
                print(f"| {name} | {rows} | {N} | chunk={ch} | {gib(r['temp'])} | {r['flops'] / 1e12:.2f} | "
                      f"{r['flops'] / base['flops']:.2f} | {ref} |", flush=True)


if __name__ == "__main__":
    main()
