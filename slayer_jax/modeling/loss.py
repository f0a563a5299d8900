"""Token NLL over a large vocabulary without materialising [B, T, V] logits.

:func:`chunked_token_nll` computes per-token ``logsumexp(logits) - logits[target]`` with
``logits = hidden @ head``, streaming over **vocabulary chunks**: the forward keeps a running
max / sum-of-exp / picked-logit per token (all [B, T] fp32); a custom VJP recomputes each
chunk's logits in the backward from the saved logsumexp, so neither pass stores more than one
[B, T, chunk] fp32 block of logits. Gradients reach ``hidden`` and ``head`` (tied embedding
or untied lm_head).

Why vocabulary chunks and not token chunks (N tokens per chip, V vocab, D width, fp32):

* token chunks of c tokens: a [c, V] logits block per step, but the head gradient is a sum
  over token chunks, so the backward carries a [D, V] fp32 accumulator (Llama-3: 4096 x
  128256 x 4 B = 2.1 GB per chip unless it is reduce-scattered every step);
* vocabulary chunks of c columns: a [N, c] logits block per step, a [N, D] fp32 accumulator
  for d(hidden) (16k tokens x 4096 x 4 B = 268 MB), and each [D, c] slice of d(head) is
  computed once, from all tokens, and written in place. The head's fsdp all-gather and the
  gradient's reduce-scatter are streamed slice by slice.

So for 128k vocab and 16k tokens per chip: plain = 8.4 GB of fp32 logits (plus as much again
for their gradient); token chunks of 1024 = 0.5 GB per block + 2.1 GB accumulator; vocabulary
chunks of 4096 = 0.27 GB per block + 0.27 GB accumulator. Vocabulary chunks it is
(bench/loss_memory.py, v5p-8 fsdp=4, compiler estimate of loss+grad temporaries per chip,
Llama-3 head: 11.0 GiB plain vs 0.94 GiB at chunk 4096 for 4 x 4096 tokens; 5.1 vs 0.50 for 1 x 4096). The head
is indexed along V, so a mesh that shards V (``tensor`` > 1 on lm_head/embedding) makes the
compiler gather it; with the repo's fsdp/data meshes V is unsharded.

Numerics mirror :func:`slayer_jax.modeling.model.unembed` + ``train.token_nll``: operands cast to
``dtype`` and multiplied with fp32 accumulation (``preferred_element_type=float32``), all
softmax arithmetic in fp32, the backward's logit cotangent kept in fp32 as JAX's own transpose
does. One deliberate difference: the head gradient of each chunk is kept in fp32 and cast to
the head's dtype (the plain path rounds it to ``dtype`` first), so with bf16 compute and fp32
master weights the chunked head gradient is slightly *more* precise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from slayer_jax.modeling.model import RMSNorm, as_dtype

DEFAULT_CHUNK = 4096  # vocabulary columns per step; see bench/loss_memory.py
# fori_loop unroll factor. XLA's cost analysis counts a loop body once, so bench/loss_memory.py
# sets True (full unroll) to count FLOPs; training keeps 1.
_UNROLL: int | bool = 1


def _as_dtype(dtype: Any) -> Any:
    return as_dtype(dtype)


def _logits(h, w, transpose_head: bool, dtype):
    """h [..., D] @ head -> [..., v] fp32, exactly as model.unembed multiplies."""
    spec = "...d,vd->...v" if transpose_head else "...d,dv->...v"
    return jnp.einsum(spec, h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position from full logits ``[..., V]``: the target's fp32 logit minus the
    fp32 logsumexp. The one definition behind the training loss (:func:`token_nll`), every
    evaluation (``evaluate.token_logprobs``: ``slayer eval``, the lm-eval backend) and the
    importance sweeps (``scoring.layer_logprobs``); :func:`chunked_token_nll` is its streamed
    form for large vocabularies."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token NLL from full logits (the plain path): ``-target_logprobs``."""
    return -target_logprobs(logits, targets)


def _chunks(V: int, chunk: int) -> tuple[int, int]:
    return V // chunk, V % chunk  # full chunks, remainder width (a static tail step)


def _slice_head(w, start, size: int, transpose_head: bool):
    axis = 0 if transpose_head else 1
    return jax.lax.dynamic_slice_in_dim(w, start, size, axis=axis)


def _fwd_step(h, w, targets, chunk_w, v0, carry, transpose_head, dtype):
    m, s, picked = carry
    logits = _logits(h, chunk_w, transpose_head, dtype)  # [..., c] fp32
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = cols == (targets - v0)[..., None]
    picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return m_new, s, picked


def _nll_and_lse(h, w, targets, chunk, dtype, transpose_head):
    V = w.shape[0] if transpose_head else w.shape[1]
    n_full, rem = _chunks(V, chunk)
    zeros = jnp.zeros(targets.shape, jnp.float32)
    carry = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros)

    def body(i, carry):
        v0 = i * chunk
        return _fwd_step(h, w, targets, _slice_head(w, v0, chunk, transpose_head), v0, carry,
                         transpose_head, dtype)

    carry = jax.lax.fori_loop(0, n_full, body, carry, unroll=_UNROLL)
    if rem:
        v0 = n_full * chunk
        carry = _fwd_step(h, w, targets, _slice_head(w, v0, rem, transpose_head), v0, carry,
                          transpose_head, dtype)
    m, s, picked = carry
    lse = m + jnp.log(s)
    return lse - picked, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(h, w, targets, chunk, dtype, transpose_head):
    return _nll_and_lse(h, w, targets, chunk, dtype, transpose_head)[0]


def _chunked_fwd(h, w, targets, chunk, dtype, transpose_head):
    nll, lse = _nll_and_lse(h, w, targets, chunk, dtype, transpose_head)
    return nll, (h, w, targets, lse)


def _chunked_bwd(chunk, dtype, transpose_head, res, g):
    h, w, targets, lse = res
    g = g.astype(jnp.float32)
    V = w.shape[0] if transpose_head else w.shape[1]
    n_full, rem = _chunks(V, chunk)
    # The barrier keeps XLA from CSE-ing this recompute with the forward's logits (possible once
    # the loops are fully unrolled), which would store every chunk's logits after all.
    hc = jax.lax.optimization_barrier(h.astype(dtype))
    dh_spec = "...v,vd->...d" if transpose_head else "...v,dv->...d"
    dw_spec = "...d,...v->vd" if transpose_head else "...d,...v->dv"
    axis = 0 if transpose_head else 1

    def step(chunk_w, v0, dh, dw):
        wc = chunk_w.astype(dtype)
        logits = _logits(hc, wc, transpose_head, dtype)
        cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        onehot = (cols == (targets - v0)[..., None]).astype(jnp.float32)
        dlogits = g[..., None] * (jnp.exp(logits - lse[..., None]) - onehot)  # fp32, as JAX's transpose
        dh = dh + jnp.einsum(dh_spec, dlogits, wc, preferred_element_type=jnp.float32)
        dwc = jnp.einsum(dw_spec, hc, dlogits, preferred_element_type=jnp.float32).astype(w.dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dwc, v0, axis=axis)
        return dh, dw

    def body(i, carry):
        v0 = i * chunk
        return step(_slice_head(w, v0, chunk, transpose_head), v0, *carry)

    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    carry = jax.lax.fori_loop(0, n_full, body, carry, unroll=_UNROLL)
    if rem:
        v0 = n_full * chunk
        carry = step(_slice_head(w, v0, rem, transpose_head), v0, *carry)
    dh, dw = carry
    return dh.astype(h.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                      chunk: int | None = DEFAULT_CHUNK, dtype: Any = jnp.float32,
                      transpose_head: bool = False) -> jax.Array:
    """Per-token NLL [...] fp32 of ``logits = hidden @ head`` without materialising the logits.

    hidden: [..., D], the *normed* final hidden state (what model.unembed multiplies).
    head: [D, V] (``lm_head.kernel``), or [V, D] with ``transpose_head=True`` (the tied
        ``embed.embedding``), in any dtype (e.g. fp32 master weights); cast to ``dtype``
        chunk by chunk.
    targets: [...] int, in [0, V).
    chunk: vocabulary columns per step. None, or >= V, is the plain path: full fp32 logits
        and today's ``train.token_nll``, differentiated by JAX (the reference).
    dtype: matmul operand dtype (accumulation is always fp32).

    Gradients flow to ``hidden`` and ``head`` (not ``targets``). The chunked backward
    recomputes each chunk's logits once: 8*N*D*V matmul FLOPs in all against the plain 6*N*D*V.
    """
    dtype = _as_dtype(dtype)
    D = hidden.shape[-1]
    V, Dh = (head.shape if transpose_head else head.shape[::-1])
    if Dh != D:
        raise ValueError(f"chunked_token_nll: hidden width {D} does not match head {head.shape} "
                         f"(transpose_head={transpose_head})")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_token_nll: targets {targets.shape} vs hidden {hidden.shape}")
    if chunk is not None and chunk <= 0:
        raise ValueError(f"chunked_token_nll: chunk must be positive, got {chunk}")
    targets = targets.astype(jnp.int32)
    if chunk is None or chunk >= V:
        return token_nll(_logits(hidden, head, transpose_head, dtype), targets)
    return _chunked(hidden, head, targets, int(chunk), dtype, bool(transpose_head))


def head_of(params: dict) -> tuple[jax.Array, bool]:
    """(head, transpose_head) as model.unembed uses them: lm_head [D, V] or tied embedding [V, D]."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"], False
    return params["embed"]["embedding"], True


def loss_sums_from_hidden(hidden_BxTxD: jax.Array, params: dict, cfg, targets_BxT: jax.Array,
                          weights_BxT: jax.Array, dtype: Any,
                          chunk: int | None = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights), from the last layer's output *before* the
    final norm (``forward(..., return_hidden=True)[1][-1]``): final RMSNorm as model.unembed
    applies it, then :func:`chunked_token_nll`. chunk=None is today's loss exactly."""

    dtype = _as_dtype(dtype)
    x = RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": params["norm"]}, hidden_BxTxD)
    head, transpose_head = head_of(params)
    nll = chunked_token_nll(x, head, targets_BxT, chunk=chunk, dtype=dtype, transpose_head=transpose_head)
    w = weights_BxT.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)
