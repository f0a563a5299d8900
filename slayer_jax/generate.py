"""Decoding. For now: greedy decoding by full re-forwarding (no KV cache), one compile per
length bucket. Issue 6 adds the jitted prefill + KV-cache decode loop and sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.config import ModelConfig
from slayer_jax.model import Params, forward


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
