"""Decoding: a jitted prefill, then a fused decode loop over a preallocated, GQA-aware KV cache.

Layout (shape suffixes as in :mod:`slayer_jax.modeling.model`; S is the cache length)::

    prompts ──left-pad to T (prompt bucket)──▶ prefill ──▶ cache per layer: k [B*K, Dh, S], v [B*K, S, Dh]
                                                  │            token buffer [B, S]
                                                  ▼
                          decode_chunk: lax.while_loop, one token per iteration,
                          the cache in the loop carry, updated in place

- The cache holds K (kv) heads, not H: GQA shares it between the G = H // K query heads of
  a group, exactly as :func:`slayer_jax.modeling.model.dot_product_attention` does. k is stored
  [B*K, Dh, S] and v [B*K, S, Dh]: each attention matmul contracts the cache's middle axis, fed
  with no reshape, so no step copies or transposes the cache (see :func:`cached_attention`; a
  [B, S, K, Dh] cache was transposed whole for every layer and token, half the decode time at
  S = 1024).
- Prompts are left-padded so that every row's next token sits in the same cache column; row
  ``b`` has ``pad[b]`` padding columns, its token in column ``c`` has RoPE position
  ``c - pad[b]`` and attends to columns ``pad[b] .. c`` (and, for Mistral, only the last
  ``sliding_window`` of them). Positions and the mask follow from ``pad`` and the column, so
  the cache stores nothing but k and v.
- One compile per shape bucket: batch B (rounded up to a power of two), prompt length T (a power
  of two from 16 up to ``prompt_bucket``, then multiples of it) and cache length S
  (``T + max_new_tokens`` rounded up to ``length_bucket``). Prompt lengths, ``max_new_tokens``,
  temperature, top-k, top-p, seeds and stop tokens within a bucket are traced values, never new
  traces. :data:`TRACES` counts traces.
- The cache of a (B, S) bucket is allocated once per :class:`Generator` and reused: each call
  donates it to the prefill, which donates it to the decode loop, which hands it back.
- Prefill and decode are :func:`slayer_jax.modeling.model.block` in its "prefill" and "decode" modes
  (:func:`cache_attention`) under the one layer loop, :func:`slayer_jax.modeling.model.run_layers`.
  Their weights are a :class:`DecodeWeights` layout chosen when the :class:`Generator` is built
  and held beside the params (never inside them). On CPU it is "out_in": every kernel transposed
  once to [out, in] and multiplied weights first, ``[F, D] x [D, B]`` with the B new tokens as
  columns, the orientation XLA:CPU runs about twice as fast at small B. Elsewhere it is the
  params as they are ("in_out").
- The decode loop runs ``n`` steps inside one compiled program (``lax.while_loop``); no Python
  runs per token. Stop tokens end a row inside the loop, and the loop ends when every row has.
  Stop strings and streaming need the host: then the loop runs in chunks of a few tokens,
  the host decodes text between chunks, and the same compiled program serves every chunk.

:func:`greedy_reforward` (no cache: re-runs the whole sequence for every token) is kept as the
simple reference and for the demo.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.layout import is_stacked, run_length
from slayer_jax.modeling.model import (
    KERNELS,
    MODES,
    Params,
    as_dtype,
    attention_mask,
    block,
    dot_product_attention,
    embed,
    forward,
    merge_adapters,
    rope_cos_sin,
    run_layers,
    unembed,
)

# Traces of the jitted functions below (one per compile): tests and benchmarks read this.
TRACES: collections.Counter = collections.Counter()
MAX_STOP_IDS = 8  # stop-token slots in the compiled loop (a traced array, padded with -1)


# ----------------------------------------------------------------------------- the KV cache
def cached_attention(q_BxTxHxDh, k_NxDhxS, v_NxSxDh, mask_BxTxS, dtype) -> jax.Array:
    """The "decode" mode's attention: :func:`slayer_jax.modeling.model.dot_product_attention` over one layer's
    cache, N = B * K rows.

    k is [B*K, Dh, S] and v [B*K, S, Dh]: with one query token (times G heads) the cache is the
    large operand of both matmuls, and both contract its middle axis, the orientation XLA:CPU's
    (YNNPACK) batched matmul runs about 3x faster than [B*K, S, Dh] for k and [B*K, Dh, S] for v
    (0.06 against 0.17-0.20 ms a layer at B = 8, S = 256; bench/RESULTS.md); and being 3-D they
    feed the matmuls directly, with no reshape between the cache update and its read (a reshape
    there made XLA fuse a second copy of the update into the matmul's operand and copy every
    layer's cache on every token).
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    N = k_NxDhxS.shape[0]
    K = N // B
    G = H // K
    q = q_BxTxHxDh.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(N, G * T, Dh)
    scores = jax.lax.dot_general(q, k_NxDhxS, (((2,), (1,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32)  # [N, G*T, S]
    scores = scores.reshape(B, K, G, T, -1) * (1.0 / np.sqrt(Dh))
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(N, G * T, -1)
    out = jax.lax.dot_general(probs, v_NxSxDh, (((2,), (1,)), ((0,), (0,))))  # [N, G*T, Dh]
    return out.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H * Dh)


def cache_attention(mode: str, mask_BxTxS, write_col, dtype):
    """The "prefill" / "decode" mode's attend for :func:`slayer_jax.modeling.model.block`, over one layer's cache.

    The cache of one layer is ``kv`` = (k [B*K, Dh, S], v [B*K, S, Dh]) (K kv heads: GQA shares
    them between the query heads of a group). The block's new k and v (T tokens) are written at
    column ``write_col``; then "prefill" attends the T new tokens among themselves (the prompt is
    the whole context) and "decode" attends to all S columns (:func:`cached_attention`).
    """
    if mode not in MODES[1:]:
        raise ValueError(f"mode: {mode!r} is not one of {MODES[1:]}")

    def attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, kv):
        B, T, K, Dh = k_BxTxKxDh.shape
        cache_k, cache_v = kv
        zero, col = jnp.zeros((), jnp.int32), jnp.asarray(write_col, jnp.int32)
        k_new = k_BxTxKxDh.transpose(0, 2, 3, 1).reshape(B * K, Dh, T)
        v_new = v_BxTxKxDh.transpose(0, 2, 1, 3).reshape(B * K, T, Dh)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k_new.astype(cache_k.dtype), (zero, zero, col))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v_new.astype(cache_v.dtype), (zero, col, zero))
        if mode == "prefill":
            attn = dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxTxS, dtype)
        else:
            attn = cached_attention(q_BxTxHxDh, cache_k.astype(dtype), cache_v.astype(dtype), mask_BxTxS, dtype)
        return attn, (cache_k, cache_v)
    return attend


def init_cache(cfg: ModelConfig, n_layers: int, batch: int, length: int, dtype: Any = jnp.float32):
    """Zeroed cache: a list with one (k [B*K, Dh, S], v [B*K, S, Dh]) pair per layer."""
    N, Dh = batch * cfg.num_key_value_heads, cfg.head_dim
    return [(jnp.zeros((N, Dh, length), dtype), jnp.zeros((N, length, Dh), dtype))
            for _ in range(n_layers)]


def cache_bytes(cfg: ModelConfig, n_layers: int, batch: int, length: int, dtype: Any = jnp.float32) -> int:
    return 2 * n_layers * batch * length * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- decode weight layouts
@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "head_VxD"], meta_fields=["kernels"])
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """The weights the decode step reads, in a layout chosen once per :class:`Generator`, beside the params.

    kernels "in_out": ``layers`` is ``params["layers"]`` itself, ``head_VxD`` None (the decode step
    reads the params as they are: accelerators). kernels "out_in" (the CPU default): ``layers`` is
    the same tree with every projection kernel transposed once to [out, in] (norm scales and biases
    shared, not copied), ``head_VxD`` the output projection [V, D] (the tied embedding itself, or the
    lm_head kernel transposed), so that each matmul is ``[F, D] x [D, B]``: XLA:CPU runs that
    orientation about twice as fast as ``[B, D] x [D, F]`` at small B (a SmolLM2 layer's seven
    projections: 1.8 against 3.2 ms at B = 8; its head 10.8 against 24 ms).
    """

    layers: list
    head_VxD: Any = None
    kernels: str = "in_out"

    @classmethod
    def build(cls, params: Params, kernels: str) -> DecodeWeights:
        if kernels not in KERNELS:
            raise ValueError(f"kernels: {kernels!r} is not one of {KERNELS}")
        if kernels == "in_out":
            return cls(params["layers"], None, kernels)
        layers = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.swapaxes(a, -1, -2) if path[-1].key == "kernel" else a, params["layers"])
        head = params["lm_head"]["kernel"].T if "lm_head" in params else params["embed"]["embedding"]
        return cls(layers, jnp.asarray(head), kernels)




# ----------------------------------------------------------------------------- sampling
def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool,
                  filtered: bool) -> jax.Array:
    """Next tokens [B] (int32).

    greedy: argmax (temperature etc. ignored). Otherwise softmax(logits / temperature), restricted
    (when ``filtered``) to the ``top_k`` largest logits (0 = no limit) and then to the smallest
    set of the largest probabilities whose mass reaches ``top_p`` (the token that crosses
    ``top_p`` is kept; 1.0 = no limit); the order of transformers' warpers (temperature, top-k,
    top-p). Ties at a cut-off are all kept. temperature, top_k, top_p are traced scalars.
    """
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x = logits_BxV.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    if filtered:
        V = x.shape[-1]
        desc = -jnp.sort(-x, axis=-1)  # [B, V] descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (x.shape[0], 1)).astype(jnp.int32), axis=-1)
        desc = jnp.where(desc < kth, -jnp.inf, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
        keep = (before < top_p) & (desc > -jnp.inf)
        keep = keep.at[:, 0].set(True)
        thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < thresh, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- prefill / decode
def _row_positions(cols, pad_B):
    """RoPE positions of columns ``cols`` for rows with ``pad_B`` left-padding columns (>= 0)."""
    return jnp.maximum(cols[None, :] - pad_B[:, None], 0).astype(jnp.int32)


def _decode_mask(col, pad_B, S, sliding_window):
    """[B, 1, S]: the token in column ``col`` sees columns pad..col (within the window)."""
    s = jnp.arange(S, dtype=jnp.int32)[None, :]
    ok = (s >= pad_B[:, None]) & (s <= col)
    if sliding_window is not None:
        ok &= s > col - sliding_window
    return ok[:, None, :]


def _stopped(tok_B, stop_ids):
    return jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)


def _run_cached(params: Params, weights: DecodeWeights, tokens_BxT, pos_BxT, mask_BxTxS, cache, write_col,
                mode: str, cfg: ModelConfig, dtype):
    """The tokens through every layer in ``mode``, their k, v written at ``write_col``: the last
    token's logits [B, V] (float32) and the new cache."""
    cos, sin = rope_cos_sin(pos_BxT, cfg.rope_inv_freq(), dtype)
    attend = cache_attention(mode, mask_BxTxS, write_col, dtype)

    def step(layer, x, kv):
        return block(cfg, dtype, layer, x, cos, sin, attend, kv, weights.kernels)

    x, cache, _ = run_layers(weights.layers, embed(params, tokens_BxT, dtype), step, cache)
    return unembed(params, cfg, x[:, -1:], dtype, weights.head_VxD)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "greedy", "filtered", "keep_logits"),
                   donate_argnames=("cache",))
def prefill(params: Params, weights: DecodeWeights, tokens_BxT, pad_B, active_B, cache, key, temperature, top_k,
            top_p, stop_ids, *, cfg: ModelConfig, dtype, greedy: bool, filtered: bool, keep_logits: bool):
    """Run the left-padded prompts, fill cache columns 0..T-1, sample the first new token.

    Returns the decode state: {"cache", "buf" [B, S] tokens by column, "col" (the next column to
    fill), "done" [B], "pad" [B], "key", and "logits" [B, S, V] if ``keep_logits``}.
    """
    TRACES["prefill"] += 1
    B, T = tokens_BxT.shape
    S = cache[0][1].shape[1]  # v [B*K, S, Dh]
    cols = jnp.arange(T, dtype=jnp.int32)
    pos = _row_positions(cols, pad_B)
    seg = (cols[None, :] >= pad_B[:, None]).astype(jnp.int32)  # 0 = left padding (sees only padding)
    mask = attention_mask(pos, pos, seg, seg, cfg.sliding_window)
    logits, new_cache = _run_cached(params, weights, tokens_BxT, pos, mask, cache, 0, "prefill", cfg, dtype)
    key, sub = jax.random.split(key)
    done = ~active_B
    tok = jnp.where(done, 0, sample_logits(logits, sub, temperature, top_k, top_p, greedy=greedy, filtered=filtered))
    buf = jnp.zeros((B, S), jnp.int32).at[:, :T].set(tokens_BxT).at[:, T].set(tok)
    state = {"cache": new_cache, "buf": buf, "col": jnp.int32(T + 1), "done": done | _stopped(tok, stop_ids),
             "pad": pad_B, "key": key}
    if keep_logits:
        state["logits"] = jnp.zeros((B, S, logits.shape[-1]), jnp.float32).at[:, T].set(logits)
    return state


def _decode_step(params, weights, state, temperature, top_k, top_p, stop_ids, cfg, dtype, greedy, filtered):
    col = state["col"]
    S = state["buf"].shape[1]
    prev = col - 1  # the newest token sits in column col - 1: run it, predict column col
    tok_Bx1 = jax.lax.dynamic_slice_in_dim(state["buf"], prev, 1, axis=1)
    pad = state["pad"]
    pos = jnp.maximum(prev - pad, 0)[:, None].astype(jnp.int32)
    mask = _decode_mask(prev, pad, S, cfg.sliding_window)
    logits, new_cache = _run_cached(params, weights, tok_Bx1, pos, mask, state["cache"], prev, "decode", cfg, dtype)
    key, sub = (state["key"], state["key"]) if greedy else jax.random.split(state["key"])
    nxt = sample_logits(logits, sub, temperature, top_k, top_p, greedy=greedy, filtered=filtered)
    nxt = jnp.where(state["done"], 0, nxt)
    out = dict(state, cache=new_cache, key=key, col=col + 1,
               buf=jax.lax.dynamic_update_slice(state["buf"], nxt[:, None], (jnp.int32(0), col)),
               done=state["done"] | _stopped(nxt, stop_ids))
    if "logits" in state:
        out["logits"] = jax.lax.dynamic_update_slice(state["logits"], logits[:, None, :],
                                                     (jnp.int32(0), col, jnp.int32(0)))
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "greedy", "filtered"), donate_argnames=("state",))
def decode_chunk(params: Params, weights: DecodeWeights, state, end_col, temperature, top_k, top_p, stop_ids, *,
                 cfg: ModelConfig, dtype, greedy: bool, filtered: bool):
    """Decode until column ``end_col`` (exclusive) is reached or every row is done, in one program."""
    TRACES["decode_chunk"] += 1
    end_col = jnp.minimum(end_col, state["buf"].shape[1])

    def cond(s):
        return (s["col"] < end_col) & ~jnp.all(s["done"])

    def body(s):
        return _decode_step(params, weights, s, temperature, top_k, top_p, stop_ids, cfg, dtype, greedy, filtered)

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------- host side
@dataclasses.dataclass
class Completion:
    """One prompt's continuation.

    tokens: generated ids (including a stop token that ended it; cut after the token that
        completed a stop string). text: their decoded text (special tokens skipped), cut just
        before a stop string. finish: "stop_token", "stop_string" or "length".
    logits: [len(tokens), V] float32, only when asked for.
    """

    tokens: list[int]
    text: str | None = None
    finish: str = "length"
    logits: np.ndarray | None = None


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1


class Generator:
    """Batched generation for one model: buckets, compiled functions and KV caches live here.

        gen = Generator(params, cfg, tokenizer)
        outs = gen.generate(["Once upon a time", "def add(a, b):"], max_new_tokens=64,
                            temperature=0.8, top_p=0.95, stop_strings=["\\n\\n"])
        for piece in gen.stream("Hello", max_new_tokens=32, chat=True): print(piece, end="")

    Prompts are strings (tokenised with ``tokenizer``) or lists of token ids.
    """

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Any = None, *, dtype: Any = "float32",
                 prompt_bucket: int = 64, length_bucket: int = 128, max_batch: int = 64,
                 feature_major: bool | None = None):
        self.cfg, self.tok = cfg, tokenizer
        # The decode step's weight layout (DecodeWeights), chosen here and held beside the params: on CPU
        # (feature_major=None -> True) a transposed copy of each layer's kernels and of an untied lm_head,
        # made once; accelerators read either layout at full speed, so there decoding reads the params.
        if feature_major is None:
            feature_major = jax.default_backend() == "cpu"
        self.feature_major = bool(feature_major)
        params = merge_adapters(params)  # decoding reads plain kernels: LoRA adapters folded in
        self.params = params
        self.weights = DecodeWeights.build(params, "out_in" if self.feature_major else "in_out")
        self.dtype = as_dtype(dtype)
        self.prompt_bucket, self.length_bucket, self.max_batch = prompt_bucket, length_bucket, max_batch
        self._caches: dict[tuple[int, int], Any] = {}
        self.n_layers = sum(run_length(e) if is_stacked(e) else 1 for e in params["layers"])

    # -------------------------------------------------------------- tokenising
    def default_stop_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        eos = self.cfg.eos_token_id
        ids += list(eos) if isinstance(eos, tuple) else ([eos] if eos is not None else [])
        if self.tok is not None and getattr(self.tok, "eos_token_id", None) is not None:
            ids.append(int(self.tok.eos_token_id))
        return tuple(dict.fromkeys(ids))

    def encode(self, prompt: str | Sequence[int], chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if not ids:
                raise SlayerError("prompt: empty token list; expected at least one token")
            return ids
        if self.tok is None:
            raise SlayerError("prompt: a string prompt needs a tokenizer; the model has none (pass token ids)")
        if chat:
            if not getattr(self.tok, "chat_template", None):
                raise SlayerError("--chat: the tokenizer has no chat_template; expected an instruct model "
                                  "(or drop --chat)")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tok(prompt)["input_ids"])
        if not ids:
            raise SlayerError("prompt: tokenises to nothing; expected a non-empty prompt")
        return ids

    # -------------------------------------------------------------- buckets
    def buckets(self, batch: int, max_prompt: int, max_new_tokens: int) -> tuple[int, int, int]:
        B = min(_pow2(batch), _pow2(self.max_batch))
        T = _round_up(max_prompt, self.prompt_bucket)
        if max_prompt <= self.prompt_bucket:  # short prompts: 16, 32, ... (a few more prefill compiles,
            T = min(T, max(16, _pow2(max_prompt)))  # no 64-token prefill for a 15-token prompt)
        S = _round_up(T + max_new_tokens, self.length_bucket)
        limit = self.cfg.max_position_embeddings
        if max_prompt + max_new_tokens > limit:
            raise SlayerError(f"max_new_tokens: prompt ({max_prompt}) + new tokens ({max_new_tokens}) exceed the "
                              f"model's max_position_embeddings ({limit}); expected a shorter request")
        return B, T, S

    def _cache(self, B: int, S: int):
        c = self._caches.pop((B, S), None)
        return c if c is not None else init_cache(self.cfg, self.n_layers, B, S, self.dtype)

    # -------------------------------------------------------------- core
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kw) -> list[Completion]:
        """Completions of one batch of token-id prompts (at most ``max_batch``); see :meth:`iter_chunks`."""
        it = self.iter_chunks(prompts, max_new_tokens, **kw)
        while True:
            try:
                next(it)
            except StopIteration as fin:
                return fin.value

    def iter_chunks(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
                    stop_strings: Sequence[str] = (), chunk: int | None = None, return_logits: bool = False,
                    host_chunks: bool = False):
        """The core loop: yields every row's generated ids after each compiled chunk, returns Completions.

        ``chunk``: decode steps per compiled call. None: the whole continuation in one call, unless
        stop strings or ``host_chunks`` (streaming) need the host between chunks; then 8.
        ``stop_ids``: None means the model's EOS ids; ``()`` never stops early.
        """
        n = len(prompts)
        if n == 0:
            return []
        if n > self.max_batch:
            raise SlayerError(f"prompts: {n} in one batch; expected at most {self.max_batch} (use generate())")
        if max_new_tokens < 1:
            raise SlayerError(f"max_new_tokens: {max_new_tokens}; expected at least 1")
        if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise SlayerError(f"sampling: temperature={temperature}, top_k={top_k}, top_p={top_p}; expected "
                              f"temperature >= 0, top_k >= 0, 0 < top_p <= 1")
        stop_ids = self.default_stop_ids() if stop_ids is None else tuple(int(t) for t in stop_ids)
        if len(stop_ids) > MAX_STOP_IDS:
            raise SlayerError(f"stop_ids: {len(stop_ids)} ids; expected at most {MAX_STOP_IDS}")
        stop_strings = tuple(s for s in stop_strings if s)
        if stop_strings and self.tok is None:
            raise SlayerError("stop_strings: need a tokenizer to decode text; the model has none")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise SlayerError("prompts: an empty prompt; expected at least one token each")
        B, T, S = self.buckets(n, max(lens), max_new_tokens)
        tokens = np.zeros((B, T), np.int32)
        pad = np.full((B,), T - 1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p):] = p
            pad[i] = T - len(p)
        active = np.arange(B) < n
        greedy = temperature == 0.0
        filtered = not greedy and (top_k > 0 or top_p < 1.0)
        stops = np.full((MAX_STOP_IDS,), -1, np.int32)
        stops[:len(stop_ids)] = stop_ids
        samp = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.asarray(stops))
        static = dict(cfg=self.cfg, dtype=self.dtype, greedy=greedy, filtered=filtered)
        state = prefill(self.params, self.weights, jnp.asarray(tokens), jnp.asarray(pad), jnp.asarray(active),
                        self._cache(B, S), jax.random.PRNGKey(seed), *samp, keep_logits=return_logits, **static)
        end = T + max_new_tokens
        if chunk is None:
            chunk = 8 if (stop_strings or host_chunks) else max_new_tokens
        host_done = np.zeros((B,), bool)
        stop_at: dict[int, int] = {}  # row -> character index of its stop string in the text
        col = T + 1
        try:
            while True:
                if col < end:
                    state = decode_chunk(self.params, self.weights, state, jnp.int32(min(end, col + max(chunk, 1))),
                                         *samp, **static)
                buf, col, done = np.asarray(state["buf"]), int(state["col"]), np.asarray(state["done"])
                gen = [self._cut_ids(buf[i, T:col], stop_ids) for i in range(n)]
                for i in range(n):
                    if stop_strings and i not in stop_at:
                        at = _find_stop(self.tok.decode(gen[i], skip_special_tokens=True), stop_strings)
                        if at >= 0:
                            stop_at[i], host_done[i] = at, True
                yield gen
                if col >= end or (done[:n] | host_done[:n]).all():
                    break
                if host_done.any():
                    state["done"] = jnp.asarray(done | host_done)
        finally:
            self._caches[(B, S)] = state["cache"]  # handed back for the next call of this bucket
        logits = np.asarray(state["logits"]) if return_logits else None
        outs = []
        for i in range(n):
            ids = gen[i]
            finish = "stop_token" if ids and ids[-1] in stop_ids else "length"
            text = None
            if self.tok is not None:
                text = self.tok.decode(ids, skip_special_tokens=True)
                if i in stop_at:
                    finish, text = "stop_string", text[:stop_at[i]]
                    ids = self._ids_through(ids, stop_strings)
            # generated token j sits in column T + j; its logits were stored in the same column
            lg = logits[i, T:T + len(ids)] if logits is not None else None
            outs.append(Completion(tokens=[int(t) for t in ids], text=text, finish=finish, logits=lg))
        return outs

    @staticmethod
    def _cut_ids(row: np.ndarray, stop_ids: Sequence[int]) -> list[int]:
        ids = row.tolist()
        for j, t in enumerate(ids):
            if t in stop_ids:
                return ids[:j + 1]
        return ids

    def _ids_through(self, ids: list[int], stop_strings: Sequence[str]) -> list[int]:
        """The shortest prefix of ``ids`` whose text contains a stop string."""
        for j in range(1, len(ids) + 1):
            if _find_stop(self.tok.decode(ids[:j], skip_special_tokens=True), stop_strings) >= 0:
                return ids[:j]
        return ids

    # -------------------------------------------------------------- conveniences
    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128, *, chat: bool = False,
                 system: str | None = None, sort_by_length: bool = True, progress: bool = False,
                 **kw) -> list[Completion]:
        """Any number of prompts, in batches of ``max_batch`` (grouped by length); order preserved."""
        ids = [self.encode(p, chat=chat, system=system) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort_by_length else list(range(len(ids)))
        out: list[Completion | None] = [None] * len(ids)
        batches = [order[i:i + self.max_batch] for i in range(0, len(order), self.max_batch)]
        it = batches
        if progress:
            from tqdm import tqdm

            it = tqdm(batches, desc="generate", unit="batch")
        for b in it:
            for i, c in zip(b, self.generate_ids([ids[i] for i in b], max_new_tokens, **kw)):
                out[i] = c
        return out  # type: ignore[return-value]

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *, chat: bool = False,
               system: str | None = None, chunk: int = 1, stop_strings: Sequence[str] = (),
               **kw) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they are decoded (``chunk`` tokens per call).

        A piece is held back while it ends in a split UTF-8 character or could be the start of
        a stop string. ``self.last_completion`` holds the :class:`Completion` afterwards.
        """
        if self.tok is None:
            raise SlayerError("stream: needs a tokenizer to decode text")
        ids = self.encode(prompt, chat=chat, system=system)
        stop_strings = tuple(s for s in stop_strings if s)
        hold = max((len(s) - 1 for s in stop_strings), default=0)
        shown = 0
        it = self.iter_chunks([ids], max_new_tokens, chunk=chunk, host_chunks=True, stop_strings=stop_strings, **kw)
        while True:
            try:
                gen = next(it)
            except StopIteration as fin:
                self.last_completion = fin.value[0]
                break
            t = self.tok.decode(gen[0], skip_special_tokens=True)
            at = _find_stop(t, stop_strings) if stop_strings else -1
            if at >= 0:
                t = t[:at]
            else:
                if t.endswith("\ufffd"):
                    continue
                t = t[:max(shown, len(t) - hold)]
            if len(t) > shown:
                yield t[shown:]
                shown = len(t)
        final = self.last_completion.text or ""
        if len(final) > shown:
            yield final[shown:]


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             tokenizer: Any = None, **kw) -> list[Completion]:
    """One-shot functional form of :meth:`Generator.generate_ids` (token-id prompts)."""
    gen_kw = {k: kw.pop(k) for k in ("dtype", "prompt_bucket", "length_bucket", "max_batch") if k in kw}
    return Generator(params, cfg, tokenizer, **gen_kw).generate(prompts, max_new_tokens, **kw)


# ----------------------------------------------------------------------------- reference (no cache)
@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_token(params: Params, tokens_1xT: jax.Array, length: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits = forward(params, tokens_1xT, cfg)
    return jnp.argmax(logits[0, length - 1]), logits[0, length - 1]


def greedy_reforward(params: Params, cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int,
                     stop_ids: tuple[int, ...] = (), bucket: int = 64) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step. Right padding is
    harmless under the causal mask, so one compile serves every length in a bucket."""
    ids = list(prompt_ids)
    total = len(ids) + max_new_tokens
    padded_len = -(-total // bucket) * bucket
    buf = np.zeros((1, padded_len), np.int32)
    buf[0, : len(ids)] = ids
    out = []
    for _ in range(max_new_tokens):
        nxt, _ = _next_token(params, jnp.asarray(buf), jnp.int32(len(ids)), cfg)
        nxt = int(nxt)
        out.append(nxt)
        if nxt in stop_ids:
            break
        buf[0, len(ids)] = nxt
        ids.append(nxt)
    return out
