"""Batched log-likelihood scoring: perplexity on a text set, multiple-choice accuracy, any layer order.

The evaluation set is packed once into fixed-shape rows ``[R, T]`` (see :class:`EvalSet`), so
every evaluation of every model variant runs the very same compiled function:

- a text *window* is ``T`` tokens; every token after the first is a target;
- a multiple-choice question is a small *tree*: the context ("Question: ...\\nAnswer:") once,
  followed by each choice's continuation as its own branch. A branch token attends to the
  context and to earlier tokens of its own branch only, its RoPE positions continue from the
  context's, and the first token of every branch is predicted from the context's last token.
  This is exactly the stand-alone sequence ``context + choice`` for each choice, while the
  context is run once instead of once per choice;
- several windows / trees share a row as separate segments (positions restart, no attention
  across segments); unused slots are padding (segment 0).

:func:`layer_logprobs` runs the decoder as a ``lax.scan`` over *slots*. Slot ``j`` uses the block
``(stacked[a_j] + stacked[b_j]) / 2`` (``a_j == b_j``: that layer exactly; ``a_j != b_j``: the
SLayer average of two layers) with its residual-branch outputs (``o_proj``, ``down_proj``)
multiplied by ``gate_j`` (0: the slot is an exact identity). Which layers run, in which order,
duplicated, averaged or skipped is therefore *data*, never a new trace. The number of slots
is the only shape, so one sweep kind (all removals, or all insertions) compiles once.

Multiple-choice data is JSONL, one question a line::

    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome", "Madrid"], "answer": 1}

Text data is a ``.txt`` file (the whole file is one document) or JSONL with a ``"text"`` field.
``"sample"`` names the small English text / general-knowledge questions shipped in
``slayer_jax/data_samples`` (see its README for provenance); ``"large"`` the 463 generated
general questions there.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax import surgery
from slayer_jax.data.sources import check_text, iter_jsonl
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation.loglik import encode_pair
from slayer_jax.modeling.config import ModelConfig, show_value
from slayer_jax.modeling.loss import target_logprobs
from slayer_jax.modeling.model import (
    Params,
    as_dtype,
    attention_mask,
    block,
    embed,
    rope_cos_sin,
    self_attention,
    unembed,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
SAMPLE_TEXT = SAMPLES / "english_text.jsonl"
SAMPLE_MCQ = SAMPLES / "general_mcq.jsonl"
SAMPLE_MCQ_LARGE = SAMPLES / "general_mcq_large.jsonl"  # "large": forgetting.make_general_mcq's 463 questions

# Traces of the jitted functions below (one per compile): benchmarks and tests read this.
TRACES: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- data files
@dataclasses.dataclass(frozen=True)
class MCQ:
    question: str
    choices: tuple[str, ...]
    answer: int


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank line of an evaluation file (``.gz``: gzipped),
    through the package's one JSONL reader; the callers check each value's shape."""
    if not path.is_file():
        raise SlayerError(f"{path}: file not found; expected a JSONL file (one JSON object a line), or 'sample'")
    return list(iter_jsonl(path, objects=False, empty_ok=True))


def load_text(src: str | Path) -> list[str]:
    """Documents from a .txt file (one document), a .jsonl file (field "text"), or "sample"."""
    path = SAMPLE_TEXT if str(src) == "sample" else Path(src)
    if path.suffix == ".jsonl":
        docs = []
        for n, row in read_jsonl(path):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise SlayerError(f"{path}: line {n}: field 'text' is missing or empty; expected a non-empty string")
            docs.append(check_text(text, f"{path}: line {n}", "text"))
    else:
        if not path.is_file():
            raise SlayerError(f"{path}: file not found; expected a .txt or .jsonl text file, or 'sample'")
        try:
            docs = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise SlayerError(f"{path}: not UTF-8 text; expected a .txt or .jsonl text file") from None
    if not any(d.strip() for d in docs):
        raise SlayerError(f"{path}: no text; expected at least one non-empty document")
    return docs


def load_mcq(src: str | Path) -> list[MCQ]:
    """Questions from a JSONL file with fields question (str), choices (list of >= 2 str), answer (int);
    "sample" and "large" name the shipped sets."""
    path = {"sample": SAMPLE_MCQ, "large": SAMPLE_MCQ_LARGE}.get(str(src)) or Path(src)
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}: line {n}"
        if not isinstance(row, dict):
            raise SlayerError(f"{where}: expected a JSON object with fields question, choices, answer")
        q, ch, a = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise SlayerError(f"{where}: field 'question' is {show_value(q)}; expected a non-empty string")
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c.strip() for c in ch)):
            raise SlayerError(f"{where}: field 'choices' is {show_value(ch)}; expected a list of at least 2 non-empty "
                              f"strings")
        check_text(q, where, "question")
        for j, c in enumerate(ch):
            check_text(c, where, f"choices[{j}]")
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
            raise SlayerError(f"{where}: field 'answer' is {show_value(a)}; expected an integer index into 'choices' "
                              f"(0..{len(ch) - 1})")
        out.append(MCQ(q.strip(), tuple(c.strip() for c in ch), a))
    if not out:
        raise SlayerError(f"{path}: no questions; expected one JSON object a line")
    return out


# ----------------------------------------------------------------------------- tokenising
def bos_prefix(tok) -> list[int]:
    """The tokens the tokenizer itself puts before a text (e.g. Llama's BOS), else []."""
    with_ = list(tok.encode("a"))
    without = list(tok.encode("a", add_special_tokens=False))
    n = len(with_) - len(without)
    return with_[:n] if n > 0 and with_[n:] == without else []


def text_windows(tok, docs: Sequence[str], seq_len: int, max_windows: int | None = None,
                 source: str = "text") -> list[list[int]]:
    """Non-overlapping windows of ``seq_len`` tokens (BOS included) over the joined documents."""
    prefix = bos_prefix(tok)
    ids = list(tok.encode("\n\n".join(d.strip() for d in docs), add_special_tokens=False))
    step = seq_len - len(prefix)
    wins = [prefix + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    if max_windows is not None:
        wins = wins[:max_windows]
    if not wins:
        raise SlayerError(f"{source}: {len(ids)} tokens are fewer than one window of {seq_len}; "
                          f"expected more text or a smaller --seq-len")
    return wins


def mcq_prompt(q: MCQ) -> tuple[str, list[str]]:
    """The context and the choice continuations scored after it (lm-eval's ARC format)."""
    return f"Question: {q.question}\nAnswer:", [f" {c}" for c in q.choices]


def mcq_requests(tok, questions) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """Tokenised (context, " choice") requests and, per question, the indices of its requests."""

    reqs, groups = [], []
    for q in questions:
        ctx, conts = mcq_prompt(q)
        groups.append(list(range(len(reqs), len(reqs) + len(conts))))
        reqs += [encode_pair(tok, ctx, c) for c in conts]
    return reqs, groups


def mcq_metrics(lls: Sequence[float], groups: Sequence[Sequence[int]], questions) -> dict[str, Any]:
    """acc and acc_norm (lm-eval's: log-likelihood / characters of the choice), with near ties counted."""
    acc = acc_norm = ties = 0
    for g, q in zip(groups, questions):
        ll = np.asarray([lls[i] for i in g], np.float64)
        norm = ll / np.asarray([float(len(c)) for c in q.choices])
        acc += int(np.argmax(ll)) == q.answer
        acc_norm += int(np.argmax(norm)) == q.answer
        top = np.sort(ll)[-2:]
        ties += bool(top[1] - top[0] < 1e-3)
    n = len(groups)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "near_ties": ties}


def tokenize_mcq(tok, questions: Sequence[MCQ]) -> list[dict[str, Any]]:
    """Each question as {"context": ids, "choices": [ids, ...], "answer": i, "choice_chars": [n, ...]}.

    ``choice_chars`` is what lm-eval's acc_norm divides by: characters of the choice, without the leading space."""
    prefix = bos_prefix(tok)
    out = []
    for q in questions:
        ctx, conts = mcq_prompt(q)
        out.append({"context": prefix + list(tok.encode(ctx, add_special_tokens=False)),
                    "choices": [list(tok.encode(c, add_special_tokens=False)) for c in conts],
                    "answer": q.answer, "choice_chars": [len(c) for c in q.choices]})
    return out


# ----------------------------------------------------------------------------- packing
@dataclasses.dataclass
class EvalSet:
    """Fixed-shape packed rows ``[R, T]`` plus the host-side bookkeeping to turn log-probs into metrics.

    Device inputs: tokens, positions, segments (0 = padding), branches (0 = shared / plain
    sequence, k = k-th continuation), prev (row index of the token whose logits predict this one).
    Host only: target (item id whose score a token's log-prob adds to, -1 = none), text_weight
    (1 on every token of a text window) and last_weight (1 on each window's last token).
    Items ``0 .. n_text-1`` are the text windows; then one item per (question, choice).
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    branches: np.ndarray
    prev: np.ndarray
    target: np.ndarray
    text_weight: np.ndarray
    last_weight: np.ndarray
    n_text: int
    text_rows: int
    batch_size: int
    mcq_items: list[list[int]]  # per question: the item id of each choice
    answers: list[int]
    choice_chars: list[list[int]]

    @property
    def n_items(self) -> int:
        return self.n_text + sum(len(c) for c in self.mcq_items)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def device_arrays(self, rows: slice | None = None) -> tuple[np.ndarray, ...]:
        rows = slice(None) if rows is None else rows
        return (self.tokens[rows], self.positions[rows], self.segments[rows], self.branches[rows], self.prev[rows])

    def batches(self, text_only: bool = False) -> list[slice]:
        """Row slices of ``batch_size``; with ``text_only`` just those that hold text windows."""
        end = self.text_rows if text_only else len(self.tokens)
        return [slice(i, i + self.batch_size) for i in range(0, end, self.batch_size)]

    def describe(self) -> dict[str, Any]:
        return {"rows": int(len(self.tokens)), "seq_len": int(self.seq_len), "batch_size": self.batch_size,
                "text_windows": self.n_text, "text_tokens": int(self.text_weight.sum()),
                "text_targets": int((self.target[: self.text_rows] >= 0).sum()),
                "mcq_questions": len(self.mcq_items), "mcq_choices": sum(len(c) for c in self.mcq_items),
                "packed_tokens": int((self.segments > 0).sum())}


def pack(windows: Sequence[Sequence[int]], mcq: Sequence[dict[str, Any]] = (), seq_len: int | None = None,
         batch_size: int = 8, mcq_source: str = "mcq") -> EvalSet:
    """Pack text windows and tokenised questions (:func:`tokenize_mcq` format) into rows.

    Rows are first-fit packed, text rows first, so the hidden-state metrics run only on the
    batches that hold text. Batches have at most ``batch_size`` rows, evened out to waste at
    most one padding row per batch.
    """
    if seq_len is None:
        seq_len = max([len(w) for w in windows] + [1])
    units = []  # (prefix, prefix_item or None, [(branch tokens, item)], is_text)
    for i, w in enumerate(windows):
        if not 2 <= len(w) <= seq_len:
            raise SlayerError(f"text window {i}: {len(w)} tokens; expected 2..{seq_len}")
        units.append((list(w), i, [], True))
    item = len(windows)
    mcq_items, answers, cchars = [], [], []
    for qi, q in enumerate(mcq):
        ctx, choices = list(q["context"]), [list(c) for c in q["choices"]]
        n = len(ctx) + sum(len(c) for c in choices)
        if not ctx or any(not c for c in choices):
            raise SlayerError(f"{mcq_source}: question {qi + 1}: an empty context or choice after tokenising; "
                              f"expected tokens")
        if n > seq_len:
            raise SlayerError(f"{mcq_source}: question {qi + 1}: field 'question' and 'choices' are {n} tokens; "
                              f"expected at most --seq-len {seq_len} (raise --seq-len)")
        ids = list(range(item, item + len(choices)))
        item += len(choices)
        units.append((ctx, None, list(zip(choices, ids)), False))
        mcq_items.append(ids)
        answers.append(int(q["answer"]))
        cchars.append(list(q.get("choice_chars") or [len(c) for c in choices]))

    def rows_for(us):
        rows: list[list] = []  # each: [used, [units]]
        for u in us:
            n = len(u[0]) + sum(len(b) for b, _ in u[2])
            for r in rows:
                if r[0] + n <= seq_len:
                    r[0] += n
                    r[1].append(u)
                    break
            else:
                rows.append([n, [u]])
        return [r[1] for r in rows]

    if not units:
        raise SlayerError("eval set: no text windows and no questions; expected at least one of them")
    text_rows = rows_for([u for u in units if u[3]])
    all_rows = text_rows + rows_for([u for u in units if not u[3]])
    # the fewest batches of at most batch_size rows, evened out so the padding is at most one row each
    n_batches = -(-len(all_rows) // batch_size)
    batch_size = -(-len(all_rows) // n_batches)
    all_rows += [[]] * (n_batches * batch_size - len(all_rows))
    R, T = len(all_rows), seq_len
    a = {k: np.zeros((R, T), np.int32) for k in ("tokens", "positions", "segments", "branches", "prev")}
    a["target"] = np.full((R, T), -1, np.int32)
    tw, lw = np.zeros((R, T), np.float32), np.zeros((R, T), np.float32)
    a["prev"][:] = np.arange(T, dtype=np.int32)
    for r, row in enumerate(all_rows):
        o = 0
        for s, (prefix, pitem, branches, is_text) in enumerate(row, 1):
            p = len(prefix)
            sl = slice(o, o + p)
            a["tokens"][r, sl], a["positions"][r, sl], a["segments"][r, sl] = prefix, np.arange(p), s
            a["prev"][r, o + 1:o + p] = np.arange(o, o + p - 1)
            if pitem is not None:
                a["target"][r, o + 1:o + p] = pitem
            if is_text:
                tw[r, sl] = 1.0
                lw[r, o + p - 1] = 1.0
            last_ctx, o = o + p - 1, o + p
            for k, (btoks, bitem) in enumerate(branches, 1):
                n = len(btoks)
                sl = slice(o, o + n)
                a["tokens"][r, sl], a["positions"][r, sl], a["segments"][r, sl] = btoks, np.arange(p, p + n), s
                a["branches"][r, sl], a["target"][r, sl] = k, bitem
                a["prev"][r, o] = last_ctx
                a["prev"][r, o + 1:o + n] = np.arange(o, o + n - 1)
                o += n
    return EvalSet(a["tokens"], a["positions"], a["segments"], a["branches"], a["prev"], a["target"], tw, lw,
                   len(windows), len(text_rows), batch_size, mcq_items, answers, cchars)


def build_evalset(tok, text_docs: Sequence[str], questions: Sequence[MCQ], seq_len: int = 128,
                  max_windows: int | None = None, max_questions: int | None = None, batch_size: int = 8,
                  text_source: str = "text", mcq_source: str = "mcq") -> EvalSet:
    wins = text_windows(tok, text_docs, seq_len, max_windows, text_source)
    qs = tokenize_mcq(tok, list(questions)[:max_questions] if max_questions is not None else questions)
    return pack(wins, qs, seq_len, batch_size, mcq_source)


# ----------------------------------------------------------------------------- the slot forward
def stack_layers(layers: Sequence[Params]) -> Params:
    """The list of per-layer dicts as one dict of arrays with a leading layer axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def non_layer(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != "layers"}


def identity_order(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, gate) slots that run layers 0..n-1 once each: the intact model."""
    idx = np.arange(n, dtype=np.int32)
    return idx, idx.copy(), np.ones(n, np.float32)


def tree_mask(pos_BxT, seg_BxT, branch_BxT, sliding_window):
    """Causal, same segment, and a branch token sees only the shared part and its own branch."""
    mask = attention_mask(pos_BxT, pos_BxT, seg_BxT, seg_BxT, sliding_window)
    kv_b, q_b = branch_BxT[:, None, :], branch_BxT[:, :, None]
    return mask & ((kv_b == 0) | (kv_b == q_b))


def _slot_layer(stacked: Params, a, b, gate):
    """Slot (a, b, gate): surgery's new-block rule on stacked layers a and b (a == b: layer a as
    it is; gate 0: an exact identity)."""
    return surgery.build_block(jax.tree_util.tree_map(lambda s: s[a], stacked),
                               jax.tree_util.tree_map(lambda s: s[b], stacked), outputs=gate)


def run_slots(rest: Params, stacked: Params, a_S, b_S, gate_S, tokens_BxT, pos_BxT, seg_BxT, branch_BxT,
              cfg: ModelConfig, dtype, collect: bool = False):
    """Embed, scan the slots, return the final residual state (and every state if ``collect``)."""
    cos, sin = rope_cos_sin(pos_BxT, cfg.rope_inv_freq(), dtype)
    mask = tree_mask(pos_BxT, seg_BxT, branch_BxT, cfg.sliding_window)
    attend = self_attention(cfg, dtype, mask)

    def body(x, slot):
        a, b, g = slot
        y, _ = block(cfg, dtype, _slot_layer(stacked, a, b, g), x, cos, sin, attend)
        return y, (y if collect else None)

    x0 = embed(rest, tokens_BxT, dtype)
    x, ys = jax.lax.scan(body, x0, (a_S, b_S, gate_S))
    if collect:
        return x, jnp.concatenate([x0[None], ys], axis=0)  # [S+1, B, T, D]
    return x, None


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def layer_logprobs(rest, stacked, a_S, b_S, gate_S, tokens_BxT, pos_BxT, seg_BxT, branch_BxT, prev_BxT, *,
                   cfg: ModelConfig, dtype):
    """log p(token_t | its context) for every token [B, T] (meaningless where there is no target)."""
    TRACES["layer_logprobs"] += 1
    x, _ = run_slots(rest, stacked, a_S, b_S, gate_S, tokens_BxT, pos_BxT, seg_BxT, branch_BxT, cfg, dtype)
    x_prev = jnp.take_along_axis(x, prev_BxT[..., None], axis=1)  # [B, T, D]: the state that predicts token t
    return target_logprobs(unembed(rest, cfg, x_prev, dtype), tokens_BxT)


# ----------------------------------------------------------------------------- metrics
@dataclasses.dataclass
class Scores:
    """Per-item summed log-likelihoods and target counts, and the metrics they give."""

    loglik: np.ndarray  # [n_items] float64
    count: np.ndarray  # [n_items] int

    def metrics(self, es: EvalSet) -> dict[str, float]:
        n_text = es.n_text
        out: dict[str, float] = {}
        if n_text:
            nll = -self.loglik[:n_text].sum() / max(int(self.count[:n_text].sum()), 1)
            out.update(nll=float(nll), ppl=float(math.exp(min(nll, 700.0))))
        if es.mcq_items:
            correct = correct_norm = 0
            for ids, ans, nb in zip(es.mcq_items, es.answers, es.choice_chars):
                ll = self.loglik[ids]
                correct += int(np.argmax(ll)) == ans
                correct_norm += int(np.argmax(ll / np.asarray(nb, np.float64))) == ans
            out.update(acc=correct / len(es.mcq_items), acc_norm=correct_norm / len(es.mcq_items))
        return out


def aggregate(lp_RxT: np.ndarray, es: EvalSet) -> Scores:
    sel = es.target >= 0
    items = es.target[sel]
    loglik = np.bincount(items, weights=np.asarray(lp_RxT, np.float64)[sel], minlength=es.n_items)
    return Scores(loglik, np.bincount(items, minlength=es.n_items))


def score_slots(rest: Params, stacked: Params, slots, es: EvalSet, cfg: ModelConfig, dtype="float32") -> Scores:
    """Evaluate one slot arrangement ``(a, b, gate)`` on the whole set (one compiled call per batch)."""
    dtype = as_dtype(dtype)
    a, b, g = (jnp.asarray(x) for x in slots)
    outs = [layer_logprobs(rest, stacked, a, b, g, *es.device_arrays(sl), cfg=cfg, dtype=dtype)
            for sl in es.batches()]  # dispatched asynchronously, gathered below
    return aggregate(np.concatenate([np.asarray(o) for o in outs]), es)


def score_params(params: Params, es: EvalSet, cfg: ModelConfig, dtype="float32") -> Scores:
    """Evaluate a params tree (any layer count) as it is."""
    return score_slots(non_layer(params), stack_layers(params["layers"]), identity_order(len(params["layers"])),
                       es, cfg, dtype)
