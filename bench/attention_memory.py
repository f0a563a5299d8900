"""Per-layer attention temporaries, xla vs splash, from the TPU compiler (deviceless v5p compile).

One attention call's forward + backward (its output and vjp w.r.t. q, k, v for a given output
cotangent), 32 query heads x 128 head dim,
8 or 32 kv heads, bf16, batch 1 per chip, causal with segment ids, compiled for a v5p:2x2x1
topology (4 chips, mesh data=4) without a TPU. The figures are the compiler's estimate
(``compiled.memory_analysis().temp_size_in_bytes``, per chip), not a measurement.

Needs libtpu importable, e.g.:

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=/tmp/libtpu_site JAX_PLATFORMS=cpu python bench/attention_memory.py
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slayer_jax.modeling import attention as A


def v5p_mesh(device: str = "v5p-8"):
    from slayer_jax.parallel.sharding import make_mesh
    from slayer_jax.training.aot import accelerator, tpu_devices

    return make_mesh("data=-1", devices=tpu_devices(accelerator(device)))


def attention_temp_bytes(mesh, backend: str, T: int, H: int, K: int, Dh: int, dtype=jnp.bfloat16,
                         sliding_window: int | None = None) -> int:
    """Temporaries (bytes per chip, the TPU compiler's estimate) of one attention call's output and its
    vjp w.r.t. q, k, v; inputs, the incoming cotangent and the outputs are not temporaries."""
    B = mesh.shape["data"] * mesh.shape["fsdp"]  # batch 1 per chip
    sh4 = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    sh2 = NamedSharding(mesh, P(("data", "fsdp"), None))

    def fwd_bwd(q, k, v, seg, pos, ct):
        def f(q, k, v):
            return A.attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, sliding_window=sliding_window,
                               dtype=dtype, backend=backend, mesh=mesh)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(ct)  # the output and d/d(q, k, v) for an incoming cotangent (the o_proj's, in a model)

    args = (jax.ShapeDtypeStruct((B, T, H, Dh), dtype, sharding=sh4),
            jax.ShapeDtypeStruct((B, T, K, Dh), dtype, sharding=sh4),
            jax.ShapeDtypeStruct((B, T, K, Dh), dtype, sharding=sh4),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh2),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh2),
            jax.ShapeDtypeStruct((B, T, H * Dh), dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))))
    compiled = jax.jit(fwd_bwd).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--kv-heads", default="8,32")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args(argv)
    mesh = v5p_mesh()
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    print(f"Command: `{' '.join(['python'] + sys.argv)}`  \n"
          f"jax {jax.__version__}; deviceless compile for v5p:2x2x1 (mesh data={mesh.shape['data']}), batch 1 per chip, "
          f"{a.heads} heads x {a.head_dim}, bf16, causal + segment ids, one attention call's output + vjp w.r.t. q, k, v. "
          "Temporaries per chip, MiB: the TPU compiler's estimate (memory_analysis().temp_size_in_bytes).\n")
    print("| tokens | kv heads | xla MiB | splash MiB | xla / splash |")
    print("|---:|---:|---:|---:|---:|")
    for K in (int(x) for x in a.kv_heads.split(",")):
        for T in (int(x) for x in a.lengths.split(",")):
            t0 = time.time()
            row = {}
            for backend in ("xla", "splash"):
                try:
                    row[backend] = attention_temp_bytes(mesh, backend, T, a.heads, K, a.head_dim)
                except Exception as e:  # noqa: BLE001  (a compile that does not fit is a result too)
                    row[backend] = None
                    print(f"<!-- {backend} T={T} K={K}: {type(e).__name__}: {str(e).splitlines()[0][:200]} -->")
            x, s = row["xla"], row["splash"]
            ratio = f"{x / s:,.1f}x" if x and s else "n/a"
            print(f"| {T} | {K} | {mib(x) if x else 'failed'} | {mib(s) if s else 'failed'} | {ratio} |", flush=True)
            print(f"<!-- {time.time() - t0:.1f}s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
