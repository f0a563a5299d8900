"""An lm-evaluation-harness backend: our JAX model behind lm-eval's ``LM`` interface.

    import lm_eval
    from slayer_jax.evaluation.harness import SlayerLM, TASKS_DIR   # importing registers the model name "slayer"

    lm = SlayerLM(pretrained="path/to/hf_dir")            # or "default", a .gguf, a slayer checkpoint
    res = lm_eval.simple_evaluate(model=lm, tasks=["slayer_mcq"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR)))
    # or by name: simple_evaluate(model="slayer", model_args="pretrained=default,batch_size=8", ...)

It implements the three request types with lm-eval's own conventions (it subclasses
``TemplateLM``, so the context/continuation split is lm-eval's code):

- ``loglikelihood``: :func:`slayer_jax.evaluation.loglik.score_requests` (batched, left-truncated to
  ``max_length + 1`` tokens as the ``hf`` backend does);
- ``loglikelihood_rolling``: lm-eval's rolling windows over ``max_length``;
- ``generate_until``: :class:`slayer_jax.generate.Generator` (KV cache), with the request's
  ``until`` strings and EOS as stops, ``max_gen_toks``, and ``do_sample``/``temperature``/
  ``top_p``/``top_k``; contexts are left-truncated to ``max_length - max_gen_toks``.

``max_length`` defaults as in the ``hf`` backend: the config's ``max_position_embeddings``.
:func:`run_harness` passes ``torch_random_seed=None`` so that lm-eval does not import torch for us.
``slayer_jax/data_samples/harness_tasks`` (:data:`TASKS_DIR`) holds offline tasks over local JSONL:
``slayer_mcq`` (multiple choice), ``slayer_ppl`` (rolling perplexity), ``slayer_gen`` (generation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from slayer_jax.errors import SlayerError, first_line
from slayer_jax.evaluation.loglik import prefix_token_id, rolling_windows, score_requests
from slayer_jax.generate import Generator

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - lm-eval is an optional dependency
    raise SlayerError("harness: the PyPI package 'lm-eval' is not installed; expected `pip install lm-eval` "
                      "(or `pip install slayer_jax[eval]`)") from e

TASKS_DIR = Path(__file__).resolve().parents[1] / "data_samples" / "harness_tasks"


@register_model("slayer", "slayer_jax")
class SlayerLM(TemplateLM):
    """lm-eval LM over a slayer_jax model (HF dir, GGUF, slayer checkpoint, or ``default``)."""

    backend = "causal"

    def __init__(self, pretrained: str = "default", dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, token_budget: int = 2048,
                 loaded: Any = None, **kwargs: Any) -> None:
        super().__init__()

        if loaded is None:
            from slayer_jax.io import load_any

            loaded = load_any(pretrained)
        self.params, self.cfg, self.tokenizer = loaded
        if self.tokenizer is None:
            raise SlayerError(f"{pretrained}: no tokenizer; expected a model directory with tokenizer files")
        self.pretrained = str(pretrained)
        self.dtype = dtype
        self._batch_size = 8 if batch_size in ("auto", None) else int(str(batch_size).split(":")[0])
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.token_budget = int(token_budget)
        self.gen = Generator(self.params, self.cfg, self.tokenizer, dtype=dtype, max_batch=self._batch_size)

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:

        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length or int(self.cfg.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "slayer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw = {"add_special_tokens": False}  # the string already carries its BOS (as the hf backend does)
        ids = list(self.tokenizer.encode(string, **kw))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:

        res = score_requests(self.params, self.cfg, [(c, x) for _, c, x in requests], max_length=self.max_length,
                             token_budget=self.token_budget, dtype=self.dtype, progress=not disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:

        reqs, owner = [], []
        for i, (string,) in enumerate([r.args for r in requests]):
            for w in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
                reqs.append(w)
                owner.append(i)
        res = score_requests(self.params, self.cfg, reqs, max_length=self.max_length, token_budget=self.token_budget,
                             dtype=self.dtype, progress=not disable_tqdm)
        tot = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, res):
            tot[i] += ll
        for r, t in zip(requests, tot):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return tot

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}

        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for key, idx in groups.items():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not do_sample:
                temperature = 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            top_k = int(kw.pop("top_k", 0) or 0)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise SlayerError(f"generate_until: max_gen_toks {max_gen} is not below max_length "
                                  f"{self.max_length}; expected a smaller max_gen_toks")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in idx]
            comps = self.gen.generate(prompts, max_gen, temperature=temperature, top_p=top_p, top_k=top_k,
                                      stop_strings=[u for u in until if u], progress=not disable_tqdm)
            for i, c in zip(idx, comps):
                text = c.text or ""
                for u in until:  # the hf backend's postprocess: cut at every stop string
                    if u:
                        text = text.split(u)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


_PLACEHOLDER = {"loglikelihood": (0.0, False), "multiple_choice": (0.0, False), "loglikelihood_rolling": 0.0,
                "generate_until": ""}


def _score_with_placeholders(task: Any) -> None:
    """Run the task's own metric code (``process_results``) on every built document with placeholder
    model outputs, so a task whose target or metrics cannot work fails here, before the model runs
    (a ``doc_to_target`` that renders to an empty list breaks lm-eval's metrics only after scoring)."""
    by_doc: dict[Any, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    for insts in by_doc.values():
        task.process_results(insts[0].doc, [_PLACEHOLDER.get(i.request_type, 0.0) for i in insts])


def run_harness(lm: Any, tasks: list[str], include_path: Sequence[str] = (), limit: int | None = None,
                log_samples: bool = False, **kw: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` over ``tasks`` with our shipped task folder always included.

    lm-eval's built-in task index is loaded only when a task is not found in the local folders.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(p) for p in include_path]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=paths, include_defaults=True)
        missing = [t for t in tasks if t not in tm.all_tasks]
        if missing:
            raise SlayerError(f"--harness-tasks: unknown lm-eval task {missing[0]!r}; expected a task of lm-eval "
                              f"or of --include-path")
    built = []  # each task built from its YAML and data here, and the documents it will score made into
    for t in tasks:  # requests and scored with placeholders, so that a bad task file or row is one line
        # (simple_evaluate reseeds and rebuilds them)
        where = getattr(tm.task_index.get(t), "yaml_path", None) or "--harness-tasks"
        try:
            got = tm.load([t])
            for task in got["tasks"].values():
                task.build_all_requests(limit=limit if isinstance(limit, int) else None, rank=0, world_size=1)
                _score_with_placeholders(task)
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many types for a bad task file
            raise SlayerError(f"{where}: lm-eval task {t!r} cannot be built ({first_line(e)[:200]}); expected a "
                              f"task YAML whose fields and data lm-eval can read") from None
        built += [got["groups"][t]] if t in got["groups"] else list(got["tasks"].values())
    return lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=tm, limit=limit, log_samples=log_samples,
                                   torch_random_seed=None, **kw)


def lm_eval_cli() -> None:
    """``slayer-lm-eval``: lm-eval's own command line with ``--model slayer`` registered (lm-eval
    has no plugin discovery, so plain ``lm_eval --model slayer`` cannot find it), e.g.
    ``slayer-lm-eval --model slayer --model_args pretrained=default --tasks arc_easy``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
