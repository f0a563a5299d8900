"""Log-likelihoods of continuations given contexts, batched: the one scorer behind ``slayer eval``
(perplexity, multiple choice) and the lm-eval backend (:mod:`slayer_jax.evaluation.harness`).

Tokenisation follows lm-evaluation-harness's causal models (see :mod:`slayer_jax.evaluation.evaluate` for
the conventions); per-token log-probabilities come from :func:`slayer_jax.modeling.loss.target_logprobs`,
the function the training loss and the importance sweeps use too.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.loss import target_logprobs
from slayer_jax.modeling.model import Params, as_dtype, forward

TRACES: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- tokenising (lm-eval's way)
def encode(tok, text: str) -> list[int]:
    """``tok.encode(text)`` with the tokenizer's own default for special tokens (lm-eval's tok_encode)."""
    return list(tok.encode(text))


def prefix_token_id(tok) -> int:
    """The token an empty context becomes: BOS if the tokenizer has one, else EOS (lm-eval's HF backend)."""
    if getattr(tok, "bos_token_id", None) is not None:
        return int(tok.bos_token_id)
    return int(tok.eos_token_id)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal models split them."""
    if context == "":
        cont = list(tok.encode(continuation, add_special_tokens=False))
        p = prefix_token_id(tok)
        return ([p], cont) if p != cont[0] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering ``tokens`` (lm-eval's rolling windows, context_len=1)."""
    tokens = list(tokens)
    if not tokens:
        return []
    out = []
    first = min(max_length, len(tokens))
    out.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        out.append((tokens[end - max_length - 1:end - 1], tokens[end - n:end]))
        done += n
    # make_disjoint_window: the context stops where the continuation starts
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in out]


# ----------------------------------------------------------------------------- batched scoring
@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def token_logprobs(params: Params, tokens_BxT, targets_BxT, *, cfg: ModelConfig, dtype):
    """log p(targets[b, t] | tokens[b, :t+1]) and whether it is the argmax, both [B, T]."""
    TRACES["token_logprobs"] += 1
    logits = forward(params, tokens_BxT, cfg, dtype=dtype)  # [B, T, V] float32
    return target_logprobs(logits, targets_BxT), jnp.argmax(logits, axis=-1) == targets_BxT


def _length_bucket(n: int) -> int:
    if n <= 512:
        return max(32, -(-n // 32) * 32)
    return -(-n // 256) * 256


def length_batches(rows: Sequence[tuple], token_budget: int) -> list[tuple[int, int, list]]:
    """(T, B, rows) batches of ``rows`` (tuples whose second item is the input tokens): longest first,
    T the length bucket of a batch's longest row, B a power of two with B * T <= ``token_budget``
    (at least 1), so a whole evaluation compiles once per length bucket."""
    rows = sorted(rows, key=lambda r: -len(r[1]))
    batches = []
    j = 0
    while j < len(rows):
        T = _length_bucket(len(rows[j][1]))
        B = 1 << max(0, int(math.log2(max(1, token_budget // T))))
        batches.append((T, B, rows[j:j + B]))
        j += B
    return batches


def score_requests(params: Params, cfg: ModelConfig, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   max_length: int | None = None, token_budget: int = 2048, dtype: Any = "float32",
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy one) for each request.

    Requests are sorted by length, right-padded to a length bucket and batched under
    ``token_budget`` tokens per call; batch sizes are powers of two (padded with dummy rows), so
    a whole evaluation compiles once per length bucket.
    """
    dtype = as_dtype(dtype)
    max_length = max_length or cfg.max_position_embeddings
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise SlayerError(f"request {i}: empty context or continuation after tokenising; expected tokens")
        if len(cont) > max_length:
            raise SlayerError(f"request {i}: continuation of {len(cont)} tokens; expected at most max_length "
                              f"{max_length}")
        whole = (ctx + cont)[-(max_length + 1):]
        rows.append((i, whole[:-1], whole[1:], len(cont)))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = length_batches(rows, token_budget)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="score", unit="batch")
    pending = []
    for T, B, batch in it:
        toks = np.zeros((B, T), np.int32)
        tgts = np.zeros((B, T), np.int32)
        for r, (_, inp, tgt, _) in enumerate(batch):
            toks[r, :len(inp)], tgts[r, :len(tgt)] = inp, tgt
        lp, gr = token_logprobs(params, jnp.asarray(toks), jnp.asarray(tgts), cfg=cfg, dtype=dtype)
        pending.append((batch, lp, gr))
        if len(pending) > 2:  # keep a little ahead (async dispatch), bound memory
            _gather(pending.pop(0), out)
    for p in pending:
        _gather(p, out)
    return out  # type: ignore[return-value]


def _gather(p, out) -> None:
    batch, lp, gr = p
    lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
    for r, (i, inp, _, n) in enumerate(batch):
        L = len(inp)
        out[i] = (float(lp[r, L - n:L].sum()), bool(gr[r, L - n:L].all()))


def rolling_loglikelihood(params: Params, cfg: ModelConfig, docs_tokens: Sequence[Sequence[int]], prefix_token: int,
                          max_length: int, **kw) -> list[float]:
    """Total log-likelihood of each document (every token predicted exactly once)."""
    reqs, owner = [], []
    for d, toks in enumerate(docs_tokens):
        for w in rolling_windows(toks, prefix_token, max_length):
            reqs.append(w)
            owner.append(d)
    res = score_requests(params, cfg, reqs, max_length=max_length, **kw)
    tot = [0.0] * len(docs_tokens)
    for d, (ll, _) in zip(owner, res):
        tot[d] += ll
    return tot


# ----------------------------------------------------------------------------- tasks
