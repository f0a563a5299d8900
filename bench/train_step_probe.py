"""Where the full fine-tuning step's time goes: compiled forward / gradient of slices of SmolLM2
(batch 4 x 512, fp32), with XLA's FLOP count and the achieved GFLOP/s, and attention variants.

    python bench/train_step_probe.py [--layers 0,2,30] [--attention-layers 6]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import slayer_jax.modeling.model as M
from slayer_jax.io.assets import default_model_dir
from slayer_jax.io.hf import load_hf
from slayer_jax.modeling.loss import token_nll

B, T = 4, 512


def timed(name: str, fn, *args, repeats: int = 2) -> None:
    compiled = jax.jit(fn).lower(*args).compile()
    ca = compiled.cost_analysis()
    flops = (ca if isinstance(ca, dict) else ca[0])["flops"]
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    print(f"{name}: {best:.2f} s  {flops / 1e9:.0f} GFLOP  {flops / best / 1e9:.0f} GFLOP/s", flush=True)


def no_attention(q, k, v, mask, dtype):  # same shapes, no T x T work: the cost of everything else
    b, t, h, dh = q.shape
    return (jnp.repeat(v, h // v.shape[2], axis=2) + q).reshape(b, t, h * dh)


def causal_chunks(q, k, v, mask, dtype, chunks: int, attend=M.dot_product_attention):
    """Query chunk i attends to key chunks <= i only (skips the masked upper blocks)."""
    n = q.shape[1] // chunks
    outs = [attend(q[:, i * n:(i + 1) * n], k[:, :(i + 1) * n], v[:, :(i + 1) * n],
                   mask[:, i * n:(i + 1) * n, :(i + 1) * n], dtype) for i in range(chunks)]
    return jnp.concatenate(outs, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,2,30")
    ap.add_argument("--attention-layers", type=int, default=6)
    a = ap.parse_args()
    params, cfg, _ = load_hf(str(default_model_dir()), progress=False, tokenizer=False)
    tok = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T + 1)).astype(np.int32))
    x, y = tok[:, :-1], tok[:, 1:]

    def loss(p):
        return jnp.mean(token_nll(M.forward(p, x, cfg), y))

    for n in [int(s) for s in a.layers.split(",")]:
        p = dict(params, layers=params["layers"][:n])
        timed(f"{n} layers, forward", lambda p: M.forward(p, x, cfg), p)
        timed(f"{n} layers, gradient", jax.grad(loss), p)

    p = dict(params, layers=params["layers"][:a.attention_layers])
    original = M.dot_product_attention
    variants = [("attention as is", original), ("no attention", no_attention)]
    variants += [(f"causal {c} chunks", functools.partial(causal_chunks, chunks=c, attend=original)) for c in (2, 4, 8)]
    try:
        for name, fn in variants:
            M.dot_product_attention = fn
            timed(f"{a.attention_layers} layers, gradient, {name}", jax.grad(loss), p)
    finally:
        M.dot_product_attention = original


if __name__ == "__main__":
    main()
