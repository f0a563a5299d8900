"""Benchmark: one-compile importance sweeps vs (L+1) evaluation passes, and vs recompiling per variant.

For each sweep kind (removal, expansion) it records the sweep's wall time (compile included,
L variants + the intact baseline), the number of traces (= compiles) it caused, and compares
the wall time with (L+1) x one steady-state evaluation pass of the intact model through the
same compiled function. Target: ratio <= 1.2 and exactly one compile per sweep kind.

For contrast it also times the naive route for a few layers: explicit
``surgery.remove_layers`` + a freshly jitted ``model.forward`` evaluation, which compiles
once per variant (and the plain unrolled ``model.forward`` pass, to show what the scan costs).

    python bench/importance_sweep.py                      # SmolLM2-135M-Instruct ("default")
    python bench/importance_sweep.py --model DIR --seq-len 128 --windows 8 --mcq-limit 30

Prints a markdown section for bench/RESULTS.md and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax import importance, surgery
from slayer_jax.evaluation import scoring
from slayer_jax.io import load_any
from slayer_jax.modeling.model import forward


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def naive_eval(params, es, cfg):
    """A freshly jitted plain forward over the same packed batches (compiles for every new layer count)."""
    f = jax.jit(lambda p, t, pos, seg: forward(p, t, cfg, pos, seg))
    outs = []
    for sl in es.batches():
        tok, pos, seg, _, _ = es.device_arrays(sl)
        outs.append(f(params, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(seg)))
    jax.block_until_ready(outs)
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--mcq-limit", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3, help="steady-state intact passes to time (median)")
    ap.add_argument("--naive", type=int, default=2, help="layers to time the recompile-per-variant route on")
    ap.add_argument("--interleave", type=int, default=4, help="variant/intact pass pairs timed alternately per kind")
    ap.add_argument("--json", default=None, help="write the numbers here")
    a = ap.parse_args(argv)

    params, cfg, tok = load_any(a.model)
    L = len(params["layers"])
    es = scoring.build_evalset(tok, scoring.load_text("sample"), scoring.load_mcq("sample"), a.seq_len, a.windows,
                               a.mcq_limit, a.batch_size)
    d = es.describe()
    print(f"# {a.model}: {L} layers; eval set {d}", file=sys.stderr)

    rest, st = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    base_slots = {"removal": scoring.identity_order(L),
                  "expansion": importance.expansion_slots(L, L - 1, identity=True)}
    res, t_kind = {}, {}
    for kind in importance.SWEEPS:  # fresh process: each kind's first call compiles
        r = importance.sweep(params, es, cfg, kind, progress=True)
        # steady-state passes through the same compiled function, timed right after the sweep so that
        # load from other jobs on a shared machine drifts as little as possible between the two
        t_kind[kind] = statistics.median(timed(scoring.score_slots, rest, st, base_slots[kind], es, cfg)[1]
                                         for _ in range(a.passes))
        res[kind] = {"wall_s": r["wall_s"], "compiles": r["compile_count"], "passes": r["passes"],
                     "first_pass_s": r["first_pass_s"],
                     "steady_variant_s": (r["wall_s"] - r["first_pass_s"]) / (r["passes"] - 1)}
    t_pass, t_exp_pass = t_kind["removal"], t_kind["expansion"]
    # load-robust check: variants and intact passes alternated, so both see the same load
    interleaved = {}
    for kind in importance.SWEEPS:
        make = (functools.partial(importance.removal_slots, L) if kind == "removal"
                else functools.partial(importance.expansion_slots, L))
        ratios = []
        for l in np.linspace(0, L - 1, a.interleave).astype(int).tolist():
            tv = timed(scoring.score_slots, rest, st, make(l), es, cfg)[1]
            tb = timed(scoring.score_slots, rest, st, scoring.identity_order(L), es, cfg)[1]
            ratios.append(tv / tb)
        interleaved[kind] = statistics.median(ratios)
    naive_eval(params, es, cfg)  # compile the unrolled forward for L layers
    t_unrolled = statistics.median(timed(naive_eval, params, es, cfg)[1] for _ in range(a.passes))

    naive = []
    for l in np.linspace(1, L - 2, a.naive).astype(int).tolist():
        _, t = timed(naive_eval, surgery.remove_layers(params, [l]), es, cfg)
        naive.append(t)
    t_naive = statistics.median(naive) if naive else float("nan")

    out = {"model": a.model, "layers": L, "eval": d, "t_pass_s": t_pass, "t_expansion_pass_s": t_exp_pass,
           "t_unrolled_forward_pass_s": t_unrolled, "naive_variant_s": naive,
           "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "jax": jax.__version__, "sweeps": {}}
    for kind, r in res.items():
        per_pass = t_pass if kind == "removal" else t_exp_pass
        out["sweeps"][kind] = {**r, "pass_s": per_pass, "ratio": r["wall_s"] / ((L + 1) * per_pass),
                               "interleaved_variant_over_intact": interleaved[kind],
                               "naive_estimate_s": L * t_naive + t_pass}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")

    cmd = "python bench/importance_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n## Importance sweeps: one compile per sweep kind ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `{cmd.strip()}`  ")
    print(f"Model {a.model} ({L} layers), {jax.default_backend()} backend, {os.cpu_count()} CPU cores, jax "
          f"{jax.__version__}. Eval set: {d['text_windows']} text windows x {d['seq_len']} tokens + "
          f"{d['mcq_questions']} questions ({d['mcq_choices']} choices) packed into {d['rows']} rows "
          f"({len(es.batches())} batch(es) of {d['batch_size']}).\n")
    print(f"One evaluation pass = a steady-state pass of the intact model through the sweep's compiled "
          f"function, median of {a.passes}, timed right after that sweep. The plain unrolled `model.forward` "
          f"pass (no scan): {t_unrolled:.2f} s.\n")
    print("| sweep | variants + baseline | wall (s, compile included) | first call (s, compile) | "
          "steady s/variant | one pass (s) | (L+1) x pass (s) | ratio | compiles |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, r in out["sweeps"].items():
        print(f"| {kind} | {r['passes']} | {r['wall_s']:.1f} | {r['first_pass_s']:.1f} | "
              f"{r['steady_variant_s']:.2f} | {r['pass_s']:.2f} | {(L + 1) * r['pass_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['compiles']} |")
    print("\nAlternating one variant pass with one intact (L-slot) pass, so both see the same load: median "
          "variant/intact time " + ", ".join(f"{k} {v:.2f}" for k, v in interleaved.items()) + ".")
    print(f"\nNaive route (explicit `remove_layers` + freshly jitted `forward`, compiles per variant): "
          f"{', '.join(f'{t:.1f}' for t in naive)} s per variant, so about {L * t_naive + t_pass:.0f} s for a "
          f"removal sweep, vs {res['removal']['wall_s']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
