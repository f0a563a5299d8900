"""Issue 5 (d): the masked S-strategy step of a Llama-2-7B-shaped SLayer model on one GPU.

The model is the paper's: Llama-2-7B's shapes (random weights: throughput does not depend on
their values), 8 averaged identity blocks after layers 1, 3, ..., 15, the 2 deepest layers
pruned, the new last layer refreshed: 38 layers, 9 trainable. fp32 master weights, bf16
compute, AdamW state for the trainable leaves only, remat per block, sequence 4096. The step is
``slayer_jax.training.train.train_step``, the one ``slayer train`` runs.

Each configuration runs in its own subprocess (a fresh allocator). Reported per configuration:
tokens/s, MFU counted two ways (``full``: 3 x forward FLOPs of the whole model, the usual
numerator; ``masked``: the work the step needs with frozen weight-gradients skipped; see
``slayer_jax.training.train.flops_per_token``), XLA's compiled FLOPs, optimizer-state bytes and the
device's peak memory.

    python bench/gpu_slayer7b.py [--preset llama2_7b] [--remat full,save_dots] [--batch 1,2]
                                 [--seq 4096] [--steps 6] [--warmup 2] [--json out.json]

``--preset smollm2_135m --seq 256 --steps 2 --warmup 1`` runs the same code on a CPU in a minute
(a smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
from slayer_jax import surgery
from slayer_jax.modeling.known_models import known_config
from slayer_jax.modeling.model import init_params
from slayer_jax.training.train import (OptimConfig, StepConfig, compile_step, device_peak_flops, flops_per_token, init_state,
                              make_optimizer, split_params, tree_bytes, tree_size)
preset, remat, B, T, steps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
attention = sys.argv[7]
cfg, L = known_config(preset)
out = {"preset": preset, "remat": remat, "batch": B, "seq": T, "device": jax.devices()[0].device_kind,
       "attention": attention, "loss_chunk": 4096}
t0 = time.perf_counter()
params = jax.jit(init_params, static_argnums=(0, 1))(cfg, L, jax.random.PRNGKey(0))
plan = surgery.shallow(L, L // 4, max(L // 16, 1), refresh_last=True)  # 32 layers: 8 new, 2 pruned
params, mask, lmap = surgery.apply_plan(params, plan)
trainable, frozen = split_params(params, mask)
del params
tx = make_optimizer(OptimConfig(total_steps=1000))
state = init_state(trainable, tx)
del trainable
jax.block_until_ready(state)
out["setup_s"] = time.perf_counter() - t0
n_layers = len(lmap)
idx = [r["index"] for r in lmap if r["trainable"]]
out.update(layers=n_layers, trainable_layers=len(idx), lowest_trainable=min(idx),
           trainable_params=tree_size(state["trainable"]), frozen_params=tree_size(frozen),
           opt_state_bytes=tree_bytes(state["opt_state"]))
rng = np.random.RandomState(0)
tok = rng.randint(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
         "positions": jnp.asarray(np.tile(np.arange(T, dtype=np.int32), (B, 1))),
         "segment_ids": jnp.ones((B, T), jnp.int32), "weights": jnp.ones((B, T), jnp.float32)}
step = compile_step(StepConfig(cfg, dtype="bfloat16", remat=None if remat == "none" else remat, attention=attention,
                               loss_chunk=4096), tx)
t0 = time.perf_counter()
compiled = step.lower(state, frozen, batch).compile()
out["compile_s"] = time.perf_counter() - t0
ca = compiled.cost_analysis()
out["xla_flops_per_step"] = (ca if isinstance(ca, dict) else ca[0]).get("flops")
times, losses = [], []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = compiled(state, frozen, batch)
    losses.append(float(m["loss"]))  # syncs
    if i >= warmup:
        times.append(time.perf_counter() - t0)
step_s = float(np.median(times))
fpt = flops_per_token(cfg, n_layers, T, min(idx), len(idx), False)
peak = device_peak_flops()
tps = B * T / step_s
out.update(step_s=step_s, step_times_s=times, tokens_per_s=tps, losses=losses, peak_flops=peak,
           flops_per_token=fpt, mfu_full=(fpt["full"] * tps / peak) if peak else None,
           mfu_masked=(fpt["masked"] * tps / peak) if peak else None)
try:
    out["peak_bytes_in_use"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
except Exception:
    out["peak_bytes_in_use"] = None
print("RESULT " + json.dumps(out), flush=True)
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama2_7b")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention", default="auto,xla",
                    help="attention backends to compare (auto = cuDNN flash attention on a GPU in bf16)")
    a = ap.parse_args()
    results = []
    for remat, B, attention in ((r, int(b), at) for r in a.remat.split(",") for b in a.batch.split(",")
                                for at in a.attention.split(",")):
        argv = [sys.executable, "-c", CHILD, a.preset, remat, str(B), str(a.seq), str(a.steps), str(a.warmup), attention]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {"remat": remat, "batch": B, "error": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            r = {"remat": remat, "batch": B, "error": f"timed out after {a.timeout}s"}
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
    for r in results:
        if "error" in r:
            print(f"remat={r['remat']} batch={r['batch']}: FAILED {r['error'][-300:]}", file=sys.stderr)
        else:
            mf = "" if r["mfu_full"] is None else f", MFU full {r['mfu_full']:.1%} / masked {r['mfu_masked']:.1%}"
            print(f"remat={r['remat']} batch={r['batch']}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s']:.2f}s"
                  f"{mf}, peak mem {(r['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
