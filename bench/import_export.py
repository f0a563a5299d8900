"""Import -> export wall time and peak RSS, for SmolLM2-135M and a random ~1.1B checkpoint.

Each measurement runs in a fresh subprocess, whose peak RSS (``VmHWM``) is that conversion's own
(``ru_maxrss`` is not: Linux carries it over from the forking parent, e.g. the bench while it
writes the random checkpoint).
The ~1.1B checkpoint is TinyLlama-1.1B-shaped (22 layers, d=2048, F=5632, 32 heads / 4 kv,
vocab 32000, untied), written in fp32 by the same streaming writer, never whole in memory.
Target (issue 2): peak RSS <= 1.3 x the checkpoint's bytes on disk.

``--sharded`` measures instead the per-process peak RSS of loading that checkpoint straight
into its shards (``load_any(src, dtype=float32, mesh=fsdp=4)``) on simulated CPU devices, whose
buffers are host memory: 2 JAX processes x 2 devices (``jax.distributed`` on localhost) against
1 process x 4 devices, and the old path (whole model on device 0, then ``jax.device_put`` onto
the mesh, as train.py did). ``--layers`` shrinks the model; ``--stored-dtype bfloat16`` writes it
in bf16 so the load also casts.

    python bench/import_export.py [--skip-1b] [--workdir DIR]
    python bench/import_export.py --sharded [--layers N] [--stored-dtype bfloat16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEAK_RSS = r"""
def peak_rss():
    # VmHWM starts afresh at exec; ru_maxrss keeps the forking parent's peak
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

CHILD = PEAK_RSS + r"""
import json, sys, time
t0 = time.perf_counter()
from slayer_jax.io import load_any
from slayer_jax.io.hf import save_hf
import jax
jax.numpy.zeros(1).block_until_ready()
base_rss = peak_rss()
t1 = time.perf_counter()
params, cfg, tok = load_any(sys.argv[1])
t2 = time.perf_counter()
save_hf(params, cfg, sys.argv[2], tokenizer=tok, progress=False)
t3 = time.perf_counter()
print(json.dumps({"import_s": t2 - t1, "export_s": t3 - t2, "startup_s": t1 - t0,
                  "baseline_rss": base_rss, "peak_rss": peak_rss()}))
"""

SHARDED_CHILD = PEAK_RSS + r"""
import json, sys, time
import jax
src, mode = sys.argv[1], sys.argv[2]
from slayer_jax.parallel.multihost import initialize
initialize()  # several processes: from the JAX_* environment the launcher sets
from slayer_jax.io import load_any
from slayer_jax.io import safetensors_stream as st
from slayer_jax.parallel.sharding import make_mesh, param_shardings
read = [0]
real = st.SafetensorsFile._pread
def counting(self, f, off, buf, name):
    read[0] += buf.nbytes
    return real(self, f, off, buf, name)
st.SafetensorsFile._pread = counting
mesh = make_mesh("fsdp=4")
jax.numpy.zeros(1).block_until_ready()
base = peak_rss()
t = time.perf_counter()
if mode == "sharded":
    params, cfg, tok = load_any(src, dtype="float32", mesh=mesh)
else:  # the old path: the whole model on one device, then placed on the mesh
    params, cfg, tok = load_any(src, dtype="float32")
    params = jax.device_put(params, param_shardings(params, mesh))
jax.block_until_ready(params)
dt = time.perf_counter() - t
held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
print(json.dumps({"process": jax.process_index(), "load_s": dt, "baseline_rss": base, "peak_rss": peak_rss(),
                  "held_bytes": held, "read_bytes": read[0]}))
"""

TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def write_random_checkpoint(d: Path, layers: int | None = None, dtype: str = "float32") -> None:
    import ml_dtypes

    from slayer_jax.io.hf import expected_hf_shape, hf_tensor_map
    from slayer_jax.io.safetensors_stream import write_safetensors
    from slayer_jax.modeling.config import ModelConfig

    d.mkdir(parents=True)
    hf = dict(TINYLLAMA, num_hidden_layers=layers or TINYLLAMA["num_hidden_layers"], torch_dtype=dtype)
    cfg = ModelConfig.from_hf_dict(hf)
    out = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    specs = [(name, expected_hf_shape(cfg, name), out) for _, name, _ in hf_tensor_map(cfg, hf["num_hidden_layers"])]
    shapes = {n: s for n, s, _ in specs}
    rng = np.random.default_rng(0)
    write_safetensors(d / "model.safetensors", specs,
                      lambda n: (0.02 * rng.standard_normal(shapes[n], dtype=np.float32)).astype(out, copy=False))
    (d / "config.json").write_text(json.dumps(hf))


def measure(src: Path, out: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    res["disk_bytes"] = dir_bytes(src) if src.is_dir() else src.stat().st_size
    res["peak_over_disk"] = res["peak_rss"] / res["disk_bytes"]
    return res


def measure_sharded(src: Path, mode: str, n_proc: int, devices: int, timeout: float = 1800) -> list[dict]:
    """Per-process results of SHARDED_CHILD in ``n_proc`` processes of ``devices`` CPU devices each
    (tests/multiproc.py's localhost launcher: the generic JAX_* environment, a timeout that kills)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import multiproc as mp

    logdir = Path(tempfile.mkdtemp(prefix="slayer_sharded_"))
    procs = mp.start(["-c", SHARDED_CHILD, str(src), mode], n_proc, devices, logdir)
    if mp.wait(procs, timeout) != [0] * n_proc:
        raise SystemExit(mp.logs(logdir, n_proc))
    return [json.loads(next(line for line in reversed((logdir / f"proc{i}.log").read_text().splitlines())
                            if line.startswith("{"))) for i in range(n_proc)]


def main_sharded(a: argparse.Namespace, work: Path) -> None:
    src = work / f"tinyllama_random_{a.layers or TINYLLAMA['num_hidden_layers']}L_{a.stored_dtype}"
    if not src.exists():
        write_random_checkpoint(src, a.layers, a.stored_dtype)
    disk = dir_bytes(src)
    runs = {"sharded load, 2 processes x 2 devices": ("sharded", 2, 2),
            "sharded load, 1 process x 4 devices": ("sharded", 1, 4)}
    if not a.skip_old:
        runs["old: whole model on device 0, then device_put (1 x 4)"] = ("old", 1, 4)
    rows = {name: measure_sharded(src, *args) for name, args in runs.items()}
    print(f"checkpoint: {src.name}, {disk / 1e9:.2f} GB on disk ({a.stored_dtype}), loaded as float32, mesh fsdp=4")
    print("| load | load s | baseline RSS / process | peak RSS / process | shards held / process | "
          "read / process | peak over baseline / fp32 model |")
    print("|---|---|---|---|---|---|---|")
    model_f32 = disk * (2 if a.stored_dtype == "bfloat16" else 1)
    def col(res, k, scale=1e9, fmt="{:.2f}"):
        return " / ".join(fmt.format(r[k] / scale) for r in res)

    for name, res in rows.items():
        over = " / ".join(f"{(r['peak_rss'] - r['baseline_rss']) / model_f32:.2f}" for r in res)
        print(f"| {name} | {col(res, 'load_s', 1, '{:.1f}')} | {col(res, 'baseline_rss')} GB | "
              f"{col(res, 'peak_rss')} GB | {col(res, 'held_bytes')} GB | {col(res, 'read_bytes')} GB | {over} |")
    print(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-smol", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--sharded", action="store_true", help="per-process peak RSS of the sharded load instead")
    ap.add_argument("--layers", type=int, default=None, help="--sharded: layers of the random model (default 22)")
    ap.add_argument("--stored-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-old", action="store_true", help="--sharded: skip the whole-model-then-device_put row")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="slayer_bench_"))
    if a.sharded:
        return main_sharded(a, work)
    rows = {}
    if not a.skip_smol:
        from slayer_jax.io.assets import default_model_dir

        rows["SmolLM2-135M (HF dir, fp32)"] = measure(default_model_dir(), work / "smol_out")
    if not a.skip_1b:
        src = work / "tinyllama_random"
        if not src.exists():
            write_random_checkpoint(src)
        rows["random 1.1B (TinyLlama shape, fp32)"] = measure(src, work / "tiny_out")
    print("| checkpoint | on disk | import s | export s | baseline RSS | peak RSS | peak / disk |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['disk_bytes'] / 1e9:.2f} GB | {r['import_s']:.1f} | {r['export_s']:.1f} | "
              f"{r['baseline_rss'] / 1e9:.2f} GB | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_over_disk']:.2f} |")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
