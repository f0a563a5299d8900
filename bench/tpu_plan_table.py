"""The paper-size recipes compiled by the TPU compiler for real TPU topologies, on this CPU machine.

Every figure is the compiler's estimate (libtpu's deviceless compilation through `slayer plan`'s
`compile_plan`, the step `slayer train` runs), not a measurement on a TPU: per-chip bytes against
HBM, TFLOPs per step, `optimal_seconds` (its roofline step time) and the MFU that implies, counted
on full-model FLOPs and on the masked step's own work. Compile time is this 2-core machine's.

The compiler's cost analysis does not see inside the Pallas splash-attention kernel (a custom
call): its FLOPs and `optimal_seconds` are the same at sequence 4096 and 8192 for the same tokens
per step. The last column therefore adds the attention FLOPs of the model count (the masked step's
work, causal not halved) to `optimal_seconds` at the chip's peak: a bound that still assumes the
kernel runs at peak, so that MFU remains an upper bound, but no longer leaves attention out.
Where the compiler's FLOPs per chip are below the model's own FLOPs outside attention (seen on
16-chip slices), its count misses work and no MFU is printed from it.

    python bench/tpu_plan_table.py [--recipes slayer_llama2_7b,...] [--devices v5p-8,...]
                                   [--layers N] [--seq-len 4096] [--json out.json]

Needs libtpu (`pip install -e '.[tpu]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
RECIPES = ["slayer_llama2_7b", "llama_pro_llama2_7b", "slayer_llama3_8b", "slayer_mistral_7b"]
DEVICES = ["v4-8", "v5litepod-8", "v5litepod-16", "v5p-8", "v5p-32", "v6e-8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--devices", default=",".join(DEVICES))
    ap.add_argument("--layers", type=int, default=None, help="original layers to compile (default: all)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--override", action="append", default=[], help="extra --config.key=value")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from slayer_jax.aot import accelerator, compile_plan
    from slayer_jax.configs import load_config_file

    rows = []
    print("| recipe | device | chips | GiB per chip (args / temp / total) | HBM GiB | fits | compile s | "
          "TFLOP per chip-step | optimal_seconds | est. MFU full / masked | with attention at peak: full / masked |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe in a.recipes.split(","):
        for device in a.devices.split(","):
            c = load_config_file(REPO / "configs" / f"{recipe}.py",
                                 [f"--config.data.seq_len={a.seq_len}", *a.override])
            t0 = time.perf_counter()
            try:
                info = compile_plan(c, None, device, num_layers=a.layers, target="tpu")
            except Exception as e:  # noqa: BLE001 -- a row that did not compile says why
                print(f"| {recipe} | {device} | | {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | "
                      f"{time.perf_counter() - t0:.0f} | | | | |", flush=True)
                continue
            m, gib = info["memory"], 2**30
            mfu = info.get("mfu_estimate")
            attn = attention_flops_per_device(c, info, a.layers)
            mfu_attn = None
            # the compiler must see at least the model's work outside attention; where it counts
            # less (seen on 16-chip slices), its FLOPs and optimal_seconds miss work: no MFU from them
            seen = info["model_flops_per_device"]["masked"] - attn["masked"]
            if info["flops_per_device"] < seen:
                info["flops_below_model"] = {"compiler": info["flops_per_device"], "model_without_attention": seen}
                mfu = None
            if mfu:
                secs = info["optimal_seconds"] + attn["masked"] / accelerator(device)["peak"]
                mfu_attn = {k: v / (secs * accelerator(device)["peak"]) for k, v in info["model_flops_per_device"].items()}
            rows.append({"recipe": recipe, "seq_len": a.seq_len, "batch_size": int(c.batch_size), **info,
                         "attention_flops_per_device": attn, "mfu_estimate_attention_at_peak": mfu_attn})
            print(f"| {recipe} | {device} | {info['num_devices']} | {m['argument'] / gib:.1f} / {m['temp'] / gib:.1f} / "
                  f"{m['total'] / gib:.1f} | {info['hbm'] / gib:.0f} | {'yes' if info['fits'] else 'no'} | "
                  f"{info['compile_s']:.0f} | {info['flops_per_device'] / 1e12:.1f} | "
                  f"{info.get('optimal_seconds', float('nan')):.2f} | "
                  + (f"{mfu['full']:.0%} / {mfu['masked']:.0%} | {mfu_attn['full']:.0%} / {mfu_attn['masked']:.0%} |"
                     if mfu else "below the model's FLOPs: unusable | - |" if "flops_below_model" in info
                     else "unusable | - |"), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
    print(f"\ncommand: python {' '.join(sys.argv)}; layers: {a.layers or 'all'}; sequence {a.seq_len}; "
          f"each recipe's own batch, grad_accum, remat and dtypes")


def attention_flops_per_device(c, info: dict, num_layers: int | None = None) -> dict[str, float]:
    """The attention part of the model's FLOPs per chip-step (full and masked): the count at the
    config's sequence minus the same count with attention left out (sequence 0)."""
    from slayer_jax.aot import abstract_run
    from slayer_jax.train import flops_per_token

    _, _, _, lmap, cfg = abstract_run(c, num_layers)
    trainable = [r["index"] for r in lmap if r["trainable"]]
    full = bool(c.get("full_finetune", False)) or c.plan.kind == "none"
    args = (None if full else min(trainable), len(trainable), bool(c.plan.get("train_head", False)) or full)
    T, tokens = int(c.data.seq_len), int(c.batch_size) * int(c.data.seq_len) / info["num_devices"]
    with_attn, without = flops_per_token(cfg, len(lmap), T, *args), flops_per_token(cfg, len(lmap), 0, *args)
    return {k: (with_attn[k] - without[k]) * tokens for k in with_attn}


if __name__ == "__main__":
    main()
