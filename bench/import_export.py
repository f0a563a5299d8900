"""Import -> export wall time and peak RSS, for SmolLM2-135M and a random ~1.1B checkpoint.

Each measurement runs in a fresh subprocess, so ru_maxrss is that conversion's own peak.
The ~1.1B checkpoint is TinyLlama-1.1B-shaped (22 layers, d=2048, F=5632, 32 heads / 4 kv,
vocab 32000, untied), written in fp32 by the same streaming writer, never whole in memory.
Target (issue 2): peak RSS <= 1.3 x the checkpoint's bytes on disk.

    python bench/import_export.py [--skip-1b] [--workdir DIR]
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

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from slayer_jax.io import load_any
from slayer_jax.io.hf import save_hf
import jax
jax.numpy.zeros(1).block_until_ready()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t1 = time.perf_counter()
params, cfg, tok = load_any(sys.argv[1])
t2 = time.perf_counter()
save_hf(params, cfg, sys.argv[2], tokenizer=tok, progress=False)
t3 = time.perf_counter()
print(json.dumps({"import_s": t2 - t1, "export_s": t3 - t2, "startup_s": t1 - t0,
                  "baseline_rss": base_rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def write_random_checkpoint(d: Path) -> None:
    from slayer_jax.config import ModelConfig
    from slayer_jax.io.hf import expected_hf_shape, hf_tensor_map
    from slayer_jax.io.safetensors_stream import write_safetensors

    d.mkdir(parents=True)
    cfg = ModelConfig.from_hf_dict(TINYLLAMA)
    specs = [(name, expected_hf_shape(cfg, name), np.dtype(np.float32))
             for _, name, _ in hf_tensor_map(cfg, TINYLLAMA["num_hidden_layers"])]
    shapes = {n: s for n, s, _ in specs}
    rng = np.random.default_rng(0)
    write_safetensors(d / "model.safetensors", specs,
                      lambda n: (0.02 * rng.standard_normal(shapes[n], dtype=np.float32)))
    (d / "config.json").write_text(json.dumps(TINYLLAMA))


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-smol", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="slayer_bench_"))
    rows = {}
    if not a.skip_smol:
        from slayer_jax.assets import default_model_dir

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
