"""The recall-forgetting frontier: the S strategy against LLaMA Pro, full fine-tuning and LoRA.

Every run is `slayer train` (a subprocess per run, the command a user types) on SmolLM2-135M-Instruct
with the knowledge-injection probe's training text (``slayer_jax.evaluation.probe``: fictional
people's biographies, question-answer text for half of them) as its domain corpus. All runs of a
study take the same tokens: the same steps, batch and sequence length. Each exported model is
then evaluated once, in this process, with one evaluator (``evaluate.run_eval``) and the base
model loaded once:

- recall: the probe's held-out questions (people whose question-answer text was never trained):
  multiple-choice log-likelihood accuracy (chance 0.25) and greedy exact match; the training
  split's questions too;
- forgetting: ``kl`` (mean per-token KL(base || tuned) on the shipped English text) and the
  generated general multiple-choice set (``--mcq large``, 463 questions).

Methods (``--methods``): ``slayer`` (S strategy: 7 averaged identity blocks over the first half,
as configs/smollm2_slayer.py), ``llama_pro`` (7 copied blocks spread uniformly), ``full`` (full
fine-tuning), ``lora`` (rank 8 on every projection); each at the learning rates ``--lrs-METHOD``.
Levers of the S strategy (``--levers``): ``lr_mult5`` (new blocks at 5x the rate), ``refresh``
(the refreshed last layer, one deep layer pruned), ``blocks3`` (3 new blocks instead of 7),
``importance`` (7 blocks placed by the measured importance profile: ``slayer importance --sweeps
removal`` on the shipped sample text, its recommended plan for the first half, written once to
OUT/importance/). ``--steps`` takes a list: every method runs at each length, so each point of a
study is at equal tokens with the others of its length.

    python bench/frontier.py --out /tmp/frontier --people 12 --steps 40 --seeds 0 \\
        [--methods slayer,llama_pro,full,lora] [--lrs-slayer 1e-3,5e-3] [--levers lr_mult5,refresh] [--quick]

``--quick`` evaluates by the probe's multiple choice and KL only (about a minute a model on a CPU);
``--fill-general SEEDS`` later adds the 463-question general MCQ to the recorded runs of SEEDS.

Writes OUT/results.json (one record per run), OUT/results.md (mean +- sd over seeds, and the
moonshot checked: each S-strategy point against full fine-tuning's KL interpolated at the same
recall) and OUT/frontier.png (held-out recall against KL, and against general MCQ accuracy where
measured; one line per method over its learning rates, bars one sd over seeds).
Runs already in results.json are skipped, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "slayer": ["plan.kind=shallow", "plan.expand=7"],
    "llama_pro": ["plan.kind=uniform", "plan.expand=7"],
    "full": ["plan.kind=none", "full_finetune=True"],
    "lora": ["plan.kind=lora", "plan.lora_rank=8", "plan.lora_alpha=16"],
}
LEVERS = {  # the S strategy with one lever turned
    "lr_mult5": ["plan.kind=shallow", "plan.expand=7", "optim.lr_mult.inserted=5.0"],
    "refresh": ["plan.kind=shallow", "plan.expand=7", "plan.prune=1", "plan.refresh_last=True"],
    "blocks3": ["plan.kind=shallow", "plan.expand=3"],
    "importance": ["plan.kind=file", "plan.file={out}/importance/recommended_plan.json"],
}
DEFAULT_LRS = {"slayer": "1e-3,5e-3", "llama_pro": "1e-3,5e-3", "full": "1e-4,5e-4", "lora": "1e-3,5e-3"}


def log(msg: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(out: Path, name: str, steps: int, overrides: list[str], a) -> Path:
    """One `slayer train` run; its HF export."""
    run_dir = out / "runs" / name
    args = [f"model={a.model}", f"workdir={run_dir}", f"export_dir={run_dir / 'hf'}", f"steps={steps}",
            f"batch_size={a.batch_size}", f"data.seq_len={a.seq_len}", f"data.source={out / 'probe' / 'train.jsonl'}",
            "epochs=0", "num_devices=1", "log_every=5", "eval_every=100000", "checkpoint.every=100000",
            "checkpoint.async_save=False", "optim.weight_decay=0.0", *overrides]
    cmd = [sys.executable, "-m", "slayer_jax.cli", "train", "--config", str(REPO / "configs" / "smollm2_slayer.py"),
           *[f"--config.{x}" for x in args]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: slayer train failed:\n{p.stderr[-3000:]}")
    log(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the study keeps the export (full FT: 1.4 GB saved)
    return run_dir / "hf"


def importance_plan(out: Path, a) -> None:
    """The importance lever's placement: `slayer importance` (removal sweep on the shipped sample text)
    and its recommended plan of 7 blocks in the first half, no pruning; measured once per study."""
    if (out / "importance" / "recommended_plan.json").exists():
        return
    cmd = [sys.executable, "-m", "slayer_jax.cli", "importance", a.model, "--sweeps", "removal", "--plan-expand", "7",
           "--plan-prune", "0", "--plan-region", "first_half", "--out", str(out / "importance"), "--no-progress"]
    p = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"slayer importance failed:\n{p.stderr[-3000:]}")
    plan = json.loads((out / "importance" / "recommended_plan.json").read_text())
    log(f"importance plan: new blocks after {plan['expand_after']}")


def last_loss(run_dir: Path) -> float | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def evaluate_model(export: Path, out: Path, base_loaded, a) -> dict:
    from slayer_jax.evaluation import evaluate, forgetting, probe
    from slayer_jax.io import load_any

    if a.quick:  # the demo's measures: probe multiple choice (both splits) and KL; no generation, no large MCQ
        params, cfg, tok = loaded = load_any(str(export))
        data = probe.load_probe(out / "probe")
        acc = {k: probe.probe_mcq(params, cfg, tok, data[k])[0]["acc"] for k in ("heldout", "train_questions")}
        return {"heldout_mcq": acc["heldout"], "heldout_em": None, "train_mcq": acc["train_questions"],
                "train_em": None, "kl": forgetting.eval_kl(base_loaded, loaded)["kl"], "general_mcq": None}
    res = evaluate.run_eval(str(export), ["probe", "kl", "mcq"], loaded=load_any(str(export)),
                            base_loaded=base_loaded, base=a.model, probe=str(out / "probe"), mcq="large",
                            batch_size=8)
    t = res["tasks"]
    return {"heldout_mcq": t["probe"]["heldout_mcq_acc"], "heldout_em": t["probe"]["heldout_em"],
            "train_mcq": t["probe"]["train_mcq_acc"], "train_em": t["probe"]["train_em"],
            "kl": t["kl"]["kl"], "general_mcq": t["mcq"]["acc"]}


def run_name(method: str, lr: float, steps: int, seed: int) -> str:
    """A run's folder under OUT/runs."""
    return f"{method}_lr{lr:g}_st{steps}_s{seed}"


def write_results(res_path: Path, results: list[dict]) -> None:
    """results.json rewritten atomically (temporary file, then rename)."""
    tmp = res_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(res_path)


def by_point(results: list[dict]) -> dict[tuple, list[dict]]:
    """(method, lr, steps) -> its runs, one per seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"], r["steps"]), []).append(r)
    return groups


def fill_general(results: list[dict], res_path: Path, out: Path, seeds: set[int], a) -> int:
    """The 463-question general MCQ for every recorded run of ``seeds`` without it; results.json
    rewritten after each."""
    from slayer_jax.evaluation import evaluate
    from slayer_jax.io import load_any

    for r in results:
        if r["seed"] not in seeds or r.get("general_mcq") is not None:
            continue
        run = out / "runs" / run_name(r["method"], r["lr"], r["steps"], r["seed"])
        model = a.model if r["method"] == "base" else str(run / "hf")
        params, cfg, tok = load_any(model)
        r["general_mcq"] = evaluate.eval_mcq(params, cfg, tok, "large")["acc"]
        write_results(res_path, results)
        log(f"{r['method']} lr {r['lr']:g} steps {r['steps']} seed {r['seed']}: general MCQ {r['general_mcq']:.3f}")
    return report(results, out, a)


def summarize(results: list[dict]) -> str:
    import numpy as np

    keys = ("heldout_mcq", "heldout_em", "train_mcq", "train_em", "kl", "general_mcq", "last_loss")
    groups = by_point(results)
    rows = ["| method | peak LR | steps | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for (m, lr, steps), rs in groups.items():
        cells = []
        for k in keys:
            v = [r[k] for r in rs if r.get(k) is not None]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else (f"{v[0]:.3f}" if v else "-"))
        rows.append(f"| {m} | {lr:g} | {steps} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def means(results: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(method, lr, steps) -> (mean held-out recall, mean KL, seeds)."""
    import numpy as np

    return {k: (float(np.mean([r["heldout_mcq"] for r in rs])), float(np.mean([r["kl"] for r in rs])), len(rs))
            for k, rs in by_point(results).items()}


def full_frontier(pts: dict[tuple, tuple[float, float, int]]) -> list[tuple[float, float]]:
    """Full fine-tuning's frontier as (recall, KL) points sorted by recall: its undominated mean points over
    learning rates and lengths (none has both more recall and less KL), with the base model at learning rate 0."""
    full = [(rec, kl) for (m, _lr, _st), (rec, kl, _n) in pts.items() if m in ("full", "base")]
    return sorted(p for p in full if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in full))


def moonshot(results: list[dict], recall_bar: float = 0.9) -> str:
    """The issue's moonshot, checked: each S-strategy point (any lever) against full fine-tuning's frontier,
    its KL interpolated linearly at the same held-out recall along full fine-tuning's frontier: its
    undominated points (learning rates and lengths; none has both more recall and less KL) and the
    base model as the point of learning rate zero. A point with more recall than any of full
    fine-tuning's counts as forgetting less only when its KL is also below that highest-recall point's."""
    import numpy as np

    pts = means(results)
    full = full_frontier(pts)
    lines = [f"Moonshot check (held-out recall >= {recall_bar}, and less KL than full fine-tuning at that recall; "
             f"full fine-tuning's KL interpolated along its frontier, from the base model; means over seeds):"]
    for (m, lr, steps), (rec, kl, n) in sorted(pts.items(), key=lambda kv: -kv[1][0]):
        if not m.startswith("slayer"):
            continue
        less = False
        if len(full) < 2 or rec < full[0][0]:
            verdict = "outside full fine-tuning's measured recall range: no comparison"
        elif rec > full[-1][0]:  # the frontier's KL only rises with recall: its highest point bounds it below
            less = kl < full[-1][1]
            verdict = (f"beyond full fine-tuning's highest recall ({full[-1][0]:.3f} at KL {full[-1][1]:.3f}) -> "
                       + ("S strategy has more recall and less KL" if less else "no comparison"))
        else:
            full_kl = float(np.interp(rec, [f[0] for f in full], [f[1] for f in full]))
            less = kl < full_kl
            verdict = (f"full fine-tuning at that recall: KL {full_kl:.3f} -> S strategy forgets "
                       + ("less" if less else "more"))
        met = rec >= recall_bar and less
        lines.append(f"- {m} at {lr:g}, {steps} steps ({n} seed{'s' if n > 1 else ''}): recall {rec:.3f}, "
                     f"KL {kl:.3f}; {verdict}"
                     + (" (**moonshot met**)" if met else ""))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Held-out recall against KL (and, where measured, against general MCQ accuracy): one colour per method,
    one marker per run length, each (method, length) joined in order of learning rate; full fine-tuning's
    frontier (the moonshot check's line) drawn under the KL panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    axes_x = [("kl", "forgetting: KL(base || tuned) per token, English text")]
    if any(r.get("general_mcq") is not None for r in results if r["method"] != "base"):
        axes_x.append(("general_mcq", "general MCQ accuracy, 463 questions (lower: more forgetting)"))
    fig, axs = plt.subplots(1, len(axes_x), figsize=(6.4 * len(axes_x), 5.4), squeeze=False)
    curves: dict[tuple[str, int], dict[float, list[dict]]] = {}  # (method, steps) -> lr -> runs
    for (m, lr, steps), rs in by_point(results).items():
        curves.setdefault((m, steps), {})[lr] = rs
    lengths = sorted({st for m, st in curves if m != "base"}, key=lambda st: -sum(1 for _m, s2 in curves if s2 == st))
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for m, _st in curves))}  # one per method
    marker = {0: "o"} | {st: mk for st, mk in zip(lengths, ["o", "^", "s", "D", "v"] * 4)}  # commonest length: o
    line = {st: "-" if st == lengths[0] else ":" for st in lengths} | {0: "-"}
    for ax, (xk, xlabel) in zip(axs[0], axes_x):
        if xk == "kl":
            frontier = full_frontier(means(results))
            ax.plot([f[1] for f in frontier], [f[0] for f in frontier], color="black", lw=6, alpha=0.15, zorder=0)
        for (m, steps), lrs in curves.items():  # means over seeds, bars one standard deviation
            pts = []
            for lr, rs in sorted(lrs.items()):
                rs = [r for r in rs if r.get(xk) is not None]
                if rs:
                    xs, ys = [r[xk] for r in rs], [r["heldout_mcq"] for r in rs]
                    pts.append((float(np.mean(xs)), float(np.mean(ys)), lr, float(np.std(xs)), float(np.std(ys))))
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[3] for p in pts],
                        yerr=[p[4] for p in pts], marker=marker[steps], ls=line[steps], capsize=2, color=color[m])
            for x, y, lr, *_ in pts:
                ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = [r for r in results if r["method"] == "base"]
        if base:
            ax.axhline(base[0]["heldout_mcq"], color="grey", ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recall: held-out probe MCQ accuracy")
    handles = [Line2D([], [], color=color[m], marker="o", ls="-", label=m) for m in color if m != "base"]
    handles += [Line2D([], [], color="grey", marker=marker[st], ls=line[st], label=f"{st} steps") for st in lengths]
    handles += [Line2D([], [], color="grey", ls=":", label="base model's recall"),
                Line2D([], [], color="black", lw=6, alpha=0.15, label="full fine-tuning's frontier")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.suptitle("Recall against forgetting, equal tokens per length (labels: peak LR; bars: sd over seeds)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--people", type=int, default=12)
    ap.add_argument("--probe-seed", type=int, default=0)
    ap.add_argument("--steps", default="40", help="comma-separated run lengths; every method runs at each")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="slayer,llama_pro,full,lora")
    ap.add_argument("--levers", default="")
    for m, lrs in DEFAULT_LRS.items():
        ap.add_argument(f"--lrs-{m.replace('_', '-')}", default=lrs)
    ap.add_argument("--lrs-levers", default="1e-3")
    ap.add_argument("--report-only", action="store_true", help="write results.md and frontier.png from results.json")
    ap.add_argument("--fill-general", default="", metavar="SEEDS",
                    help="add the 463-question general MCQ to the recorded runs of these seeds that lack it "
                         "(a --quick study's second axis of forgetting), then report")
    ap.add_argument("--quick", action="store_true",
                    help="evaluate by probe multiple choice and KL only (no exact match, no 463-question MCQ): "
                         "about a minute a model on a CPU instead of many")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        return report(json.loads((out / "results.json").read_text()), out, a)

    from slayer_jax.evaluation import probe
    from slayer_jax.io import load_any

    if not (out / "probe" / probe.MANIFEST).exists():
        probe.write_task(probe.make_task(a.people, a.probe_seed), out / "probe")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else []
    if a.fill_general:
        return fill_general(results, res_path, out, {int(s) for s in a.fill_general.split(",")}, a)
    done = {(r["method"], r["lr"], r["steps"], r["seed"]) for r in results}

    base_loaded = load_any(a.model)
    if ("base", 0.0, 0, 0) not in done:
        results.append({"method": "base", "lr": 0.0, "steps": 0, "seed": 0, "last_loss": None,
                        **evaluate_model(Path(a.model), out, base_loaded, a)})
        write_results(res_path, results)
        log(f"base: {results[-1]}")
    runs = []  # every method's first learning rate first, so a cut-short study still compares methods
    for m in filter(None, a.methods.split(",")):
        for k, lr in enumerate(getattr(a, f"lrs_{m}").split(",")):
            runs.append((k, m, float(lr), METHODS[m]))
    runs = [r[1:] for r in sorted(runs, key=lambda r: r[0])]
    for lever in filter(None, a.levers.split(",")):
        for lr in a.lrs_levers.split(","):
            runs.append((f"slayer+{lever}", float(lr), [x.format(out=out) for x in LEVERS[lever]]))
        if lever == "importance":
            importance_plan(out, a)
    for seed, steps in [(int(s), int(st)) for s in a.seeds.split(",") for st in a.steps.split(",")]:
        for m, lr, ov in runs:
            if (m, lr, steps, seed) in done:
                continue
            name = run_name(m, lr, steps, seed)
            export = train(out, name, steps, [*ov, f"optim.peak_lr={lr}", f"seed={seed}"], a)
            rec = {"method": m, "lr": lr, "steps": steps, "seed": seed, "last_loss": last_loss(out / "runs" / name),
                   **evaluate_model(export, out, base_loaded, a)}
            results.append(rec)
            write_results(res_path, results)
            log(f"{name}: {rec}")
    return report(results, out, a)


def report(results: list[dict], out: Path, a) -> int:
    (out / "results.md").write_text(
        f"# Recall against forgetting: {a.people} people; each run steps x {a.batch_size} x {a.seq_len} tokens\n\n"
        + summarize(results) + "\n\n" + moonshot(results) + "\n")
    plot(results, out / "frontier.png")
    print(summarize(results) + "\n\n" + moonshot(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
