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
Where the compiler's FLOPs per chip are below the model's own FLOPs outside attention (seen on v5e,
v6e and v5p-32 slices), its count misses work and no MFU is printed from it.

    python bench/tpu_plan_table.py [--recipes slayer_llama2_7b,...] [--devices v5p-8,...]
                                   [--layers N] [--seq-len 4096] [--json out.json]
                                   [--estimate] [--xla-dump DIR] [--libtpu-args="--flag=value ..."]
    python bench/tpu_plan_table.py --peak DIR/RECIPE_DEVICE   # what is live at the compiler's peak

``--estimate`` prints ``slayer plan``'s quick analytic estimate (each term) beside each row;
``--xla-dump DIR`` (one recipe and device per run) has the TPU compiler write its optimized HLO,
buffer assignment and live ranges to DIR/RECIPE_DEVICE, which ``--peak`` reads: the values live at the compiler's peak, grouped by
the jax operation that made them, and the ``AllocateBuffer`` outputs among them (the collective
matmuls' output buffers, and the f32 gradient accumulators).

``--libtpu-args`` passes flags to the TPU compiler: it sets LIBTPU_INIT_ARGS before jax loads libtpu
(libtpu reads it once per process, and aborts on a flag it does not know), and each row's JSON
records them. For example ``--libtpu-args=--xla_tpu_enable_windowed_einsum_for_all_gather=false``
(with ``=``, since the value begins with ``--``) turns the collective matmuls (windowed einsums) of
the FSDP all-gathers off.

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
    ap.add_argument("--estimate", action="store_true", help="print the quick analytic estimate's terms too")
    ap.add_argument("--xla-dump", default=None, help="dump the compiler's buffer assignment here")
    ap.add_argument("--peak", default=None, help="only report the peak of a --xla-dump directory")
    ap.add_argument("--libtpu-args", default=None,
                    help="flags for the TPU compiler, set as LIBTPU_INIT_ARGS before jax loads libtpu")
    a = ap.parse_args()
    if a.libtpu_args is not None:
        if "jax" in sys.modules:
            ap.error("--libtpu-args: jax is already imported; libtpu would not see the flags")
        os.environ["LIBTPU_INIT_ARGS"] = a.libtpu_args
    if a.peak:
        print(peak_report(a.peak))
        return
    if a.xla_dump:  # XLA reads its flags once per process: one recipe and one device per run
        if "," in a.recipes + a.devices:
            ap.error("--xla-dump: one recipe and one device per run")
        os.environ["XLA_FLAGS"] = (f"--xla_dump_to={Path(a.xla_dump) / f'{a.recipes}_{a.devices}'} "
                                   "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*")

    aot, configs, _ = _modules()
    accelerator, compile_plan, load_config_file = aot.accelerator, aot.compile_plan, configs.load_config_file

    rows = []
    print("| recipe | device | chips | GiB per chip (args / temp / total) | HBM GiB | fits | compile s | "
          "TFLOP per chip-step | optimal_seconds | est. MFU full / masked | with attention at peak: full / masked |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe in a.recipes.split(","):
        for device in a.devices.split(","):
            c = load_config_file(REPO / "configs" / f"{recipe}.py",
                                 [f"--config.data.seq_len={a.seq_len}", *a.override])
            if a.estimate:
                est = aot.plan_memory(c, None, device, num_layers=a.layers)
                print(f"<!-- estimate {recipe} {device}: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est["bytes"].items())
                      + (f"; collective-matmul bound {est['collective_matmul_bound'] / 2**30:.2f}"
                         if "collective_matmul_bound" in est else "") + " GiB -->", flush=True)
            t0 = time.perf_counter()
            try:
                info = compile_plan(c, None, device, num_layers=a.layers, target="tpu")
            except Exception as e:  # noqa: BLE001 -- a row that did not compile says why
                rows.append({"recipe": recipe, "device": device, "seq_len": a.seq_len,
                             "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                             "compile_s": time.perf_counter() - t0})
                print(f"| {recipe} | {device} | | {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | "
                      f"{time.perf_counter() - t0:.0f} | | | | |", flush=True)
                continue
            m, gib = info["memory"], 2**30
            mfu = info.get("mfu_estimate")
            attn = attention_flops_per_device(c, info, a.layers)
            mfu_attn = None
            # the compiler must see at least the model's work outside attention; where it counts
            # less (seen on v5e, v6e, v5p-32), its FLOPs and optimal_seconds miss work: no MFU from them
            seen = info["model_flops_per_device"]["masked"] - attn["masked"]
            if info["flops_per_device"] < seen:
                info["flops_below_model"] = {"compiler": info["flops_per_device"], "model_without_attention": seen}
                mfu = None
            if mfu:
                secs = info["optimal_seconds"] + attn["masked"] / accelerator(device)["peak"]
                mfu_attn = {k: v / (secs * accelerator(device)["peak"]) for k, v in info["model_flops_per_device"].items()}
            rows.append({"recipe": recipe, "seq_len": a.seq_len, "batch_size": int(c.batch_size),
                         "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""), **info,
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
          f"each recipe's own batch, grad_accum, remat and dtypes"
          + (f"; LIBTPU_INIT_ARGS={os.environ['LIBTPU_INIT_ARGS']!r}" if os.environ.get("LIBTPU_INIT_ARGS") else ""))


def _modules():
    """slayer_jax's aot, configs and train modules: under slayer_jax.training since the package's
    reorganisation into subfolders, at the top level before it."""
    try:
        from slayer_jax.training import aot, configs, train
    except ImportError:
        from slayer_jax import aot, configs, train
    return aot, configs, train


def attention_flops_per_device(c, info: dict, num_layers: int | None = None) -> dict[str, float]:
    """The attention part of the model's FLOPs per chip-step (full and masked): the count at the
    config's sequence minus the same count with attention left out (sequence 0)."""
    aot, _, train = _modules()
    flops_per_token = train.flops_per_token
    _, _, _, lmap, cfg = aot.abstract_run(c, num_layers)
    trainable = [r["index"] for r in lmap if r["trainable"]]
    full = bool(c.get("full_finetune", False)) or c.plan.kind == "none"
    args = (None if full else min(trainable), len(trainable), bool(c.plan.get("train_head", False)) or full)
    T, tokens = int(c.data.seq_len), int(c.batch_size) * int(c.data.seq_len) / info["num_devices"]
    with_attn, without = flops_per_token(cfg, len(lmap), T, *args), flops_per_token(cfg, len(lmap), 0, *args)
    return {k: (with_attn[k] - without[k]) * tokens for k in with_attn}


def peak_report(dump_dir: str, top: int = 25) -> str:
    """The values live at the TPU compiler's peak (from a --xla-dump directory), grouped by the jax
    operation that made them (HLO metadata op_name) and shape. AllocateBuffer custom calls are the
    output buffers of the compiler's collective matmuls (windowed einsums; bf16 activations such as
    [rows, T, 11008]) and, with or without them, the gradient-accumulation scan's f32 accumulators
    of the trainable weights' shards."""
    import collections
    import re

    d = Path(dump_dir)
    live = next(d.glob("*train_step*after_optimizations-live-range.txt")).read_text()
    hlo = next(d.glob("*train_step*after_optimizations.txt")).read_text()
    peak = live.split("(peak):")[1].split("Stack trace breakdown")[0]
    alloc = set(re.findall(r"%(custom-call\.\d+) = \S+ custom-call\(\), custom_call_target=\"AllocateBuffer\"", hlo))
    meta = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\s+(?:ROOT )?%(\S+) = (\S+?)(?:\{[^ ]*)? .*?op_name=\"([^\"]+)\"", hlo, re.MULTILINE)}
    shapes = dict(re.findall(r"^\s+(?:ROOT )?%(\S+) = (\S+?)(?:\{[^ ]*)? ", hlo, re.MULTILINE))
    size, count = collections.Counter(), collections.Counter()
    total = in_alloc = 0
    for name, n in re.findall(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", peak, re.MULTILINE):
        shape, op = meta.get(name, (shapes.get(name, "?"), name.split(".")[0]))
        key = f"{shape} {op.replace('jit(train_step)/while/body/closed_call/', '')[-100:]}"
        if name in alloc:
            key, in_alloc = key + " [AllocateBuffer]", in_alloc + int(n)
        size[key] += int(n)
        count[key] += 1
        total += int(n)
    gib = 2**30
    head = (f"{d.name}: live at the compiler's peak {total / gib:.2f} GiB, of which AllocateBuffer outputs "
            f"{in_alloc / gib:.2f} GiB (collective-matmul outputs, gradient accumulators); windowed einsums in the program: "
            f"{hlo.count('condition=%wide.windowed_dot_general_cond_ag')} all-gather, "
            f"{hlo.count('condition=%wide.windowed_dot_general_cond_rs')} reduce-scatter")
    lines = [head]
    lines += [f"  {count[k]:4d} x  {b / gib:6.3f} GiB  {k}" for k, b in size.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
