"""Training-step throughput, ours against transformers + torch, side by side (issue 5 benchmarks).

Variants, each in its own subprocess (so peak RSS is its own):
  (a) full fine-tuning of SmolLM2-135M, batch 4 x 512, AdamW: jax fp32, jax bf16 compute
      (fp32 masters), torch fp32;
  (b) the S-strategy expanded model (7 averaged identity blocks after 1, 3, ..., 13; 37 layers):
      masked step (new blocks only) against full fine-tuning of the same model, in jax and torch;
      plus the compiled FLOP ratio (XLA cost analysis) as the floor;
  (c) optimizer-state bytes and peak RSS for each.

    python bench/train_step.py [--steps 3] [--warmup 2] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

B, T = 4, 512

CHILD = r'''
import json, os, resource, sys, time
import numpy as np
name, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
B, T = 4, 512
from slayer_jax.io.assets import default_model_dir
model_dir = str(default_model_dir())
rng = np.random.RandomState(0)
tokens = rng.randint(0, 49152, (B, T + 1)).astype(np.int32)
expanded = "expanded" in name
masked = "masked" in name
out = {"name": name}
if name.startswith("jax"):
    import functools, jax, jax.numpy as jnp
    from slayer_jax.io.hf import load_hf
    from slayer_jax import surgery
    from slayer_jax.training.train import (OptimConfig, StepConfig, compile_step, init_state, make_optimizer, split_params,
                                  train_step, tree_bytes)
    params, cfg, _ = load_hf(model_dir, progress=False, tokenizer=False)
    if expanded:
        params, mask, _ = surgery.apply_plan(params, surgery.shallow(30, 7, 0))
    else:
        mask = jax.tree_util.tree_map(lambda _: True, params)
    if not masked:
        mask = jax.tree_util.tree_map(lambda _: True, params)
    tr, fr = split_params(params, mask)
    tx = make_optimizer(OptimConfig(total_steps=100))
    sc = StepConfig(cfg, dtype="bfloat16" if "bf16" in name else "float32")
    state = init_state(tr, tx)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "positions": jnp.asarray(np.tile(np.arange(T, dtype=np.int32), (B, 1))),
             "segment_ids": jnp.ones((B, T), jnp.int32), "weights": jnp.ones((B, T), jnp.float32)}
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(train_step, sc=sc, tx=tx), donate_argnums=(0,)).lower(state, fr, batch).compile()
    out["compile_s"] = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    out["xla_flops"] = (ca if isinstance(ca, dict) else ca[0])["flops"]
    out["opt_state_bytes"] = tree_bytes(state["opt_state"])
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, fr, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    out["loss"] = float(m["loss"])
else:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if expanded:  # same structure: identity blocks after 1,3,...,13 (built by our exporter)
        from slayer_jax.io.hf import load_hf, save_hf
        from slayer_jax import surgery
        import tempfile
        p, cfg, _ = load_hf(model_dir, progress=False, tokenizer=False)
        p, _, lmap = surgery.apply_plan(p, surgery.shallow(30, 7, 0))
        d = tempfile.mkdtemp()
        save_hf(p, cfg, d + "/m", progress=False)
        model = AutoModelForCausalLM.from_pretrained(d + "/m", dtype=torch.float32, attn_implementation="sdpa")
        if masked:
            trainable = {r["index"] for r in lmap if r["trainable"]}
            for n, prm in model.named_parameters():
                parts = n.split(".")
                prm.requires_grad = len(parts) > 2 and parts[1] == "layers" and int(parts[2]) in trainable
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x = torch.as_tensor(tokens, dtype=torch.long)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone() if False else None).logits
        loss = torch.nn.functional.cross_entropy(loss.reshape(-1, loss.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    out["opt_state_bytes"] = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                 if torch.is_tensor(v) and v.ndim > 0)
    out["loss"] = float(loss)
    out["torch_threads"] = torch.get_num_threads()
steady = sorted(times[warmup:])
out["step_s"] = steady[len(steady) // 2]
out["tokens_per_s"] = B * T / out["step_s"]
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps(out))
'''

VARIANTS = ["jax_full_fp32", "torch_full_fp32", "jax_full_bf16", "jax_expanded_full", "jax_expanded_masked",
            "torch_expanded_full", "torch_expanded_masked"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else VARIANTS
    rows = {}
    for name in names:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, name, str(a.steps), str(a.warmup)], capture_output=True,
                           text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            continue
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[name]["wall_s"] = time.perf_counter() - t
        print(json.dumps(rows[name]), flush=True)
    print("\n| variant | step s | tokens/s | opt state | peak RSS | XLA GFLOP/step |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        fl = f"{r['xla_flops'] / 1e9:.0f}" if "xla_flops" in r else ""
        print(f"| {n} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['opt_state_bytes'] / 1e6:.0f} MB | "
              f"{r['peak_rss_gb']:.2f} GB | {fl} |")
    if "jax_full_fp32" in rows and "torch_full_fp32" in rows:
        print(f"\n(a) jax/torch full FT fp32 speedup: {rows['jax_full_fp32']['tokens_per_s'] / rows['torch_full_fp32']['tokens_per_s']:.2f}x")
    if "jax_expanded_masked" in rows and "jax_expanded_full" in rows:
        t_ratio = rows["jax_expanded_masked"]["step_s"] / rows["jax_expanded_full"]["step_s"]
        f_ratio = rows["jax_expanded_masked"]["xla_flops"] / rows["jax_expanded_full"]["xla_flops"]
        print(f"(b) jax masked/full step time {t_ratio:.3f}, FLOP ratio {f_ratio:.3f}, time/FLOP-ratio {t_ratio / f_ratio:.3f}")
    if "torch_expanded_masked" in rows and "torch_expanded_full" in rows:
        print(f"    torch masked/full step time {rows['torch_expanded_masked']['step_s'] / rows['torch_expanded_full']['step_s']:.3f}")
    json.dump(rows, open("/tmp/train_step_bench.json", "w"), indent=2)


if __name__ == "__main__":
    main()
