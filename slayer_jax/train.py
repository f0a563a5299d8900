"""Masked, sharded training: only the trainable subtree gets gradients and optimizer state.

The params tree is split by the trainable mask into two trees of the same structure, with
``None`` where a leaf belongs to the other side:

- ``trainable``: differentiated, updated, and the only tree the optimizer sees, so frozen
  leaves hold no Adam state at all (not even zeros: ``optax.masked(set_to_zero)`` chained
  after Adam would still allocate both moments for every parameter);
- ``frozen``: passed into the jitted step as a plain argument, a constant of the loss. XLA
  then drops the weight-gradient matmuls of every frozen layer and all backward work below
  the lowest trainable layer (checked on the compiled cost analysis in the tests).

Weight decay applies to trainable kernels and embeddings only (never norms or biases);
gradient clipping is by the global norm over the trainable leaves only. Gradient
accumulation sums per-token losses and gradients over microbatches and divides by the total
token weight once, so it is the same update as one step on the large batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slayer_jax.config import ModelConfig
from slayer_jax.model import Params, as_dtype, forward

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids: int32 [B, T]; weights: f32 [B, T]


# ----------------------------------------------------------------------------- split / merge
def _is_none(x: Any) -> bool:
    return x is None


def split_params(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): same structure, ``None`` at the other side's leaves."""
    trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def merge_params(trainable: Params, frozen: Params) -> Params:
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def decay_mask(tree: Params) -> Params:
    """True for kernels and embeddings; norms ("scale") and biases are never decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), tree)


# ----------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Defaults as LLaMA Pro: peak 2e-4, 6% warmup then cosine, weight decay 0.1, clip 1.0."""

    total_steps: int
    peak_lr: float = 2e-4
    warmup_frac: float = 0.06
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    warmup = max(1, int(round(c.warmup_frac * c.total_steps))) if c.warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.peak_lr, warmup_steps=warmup, decay_steps=max(c.total_steps, warmup + 1),
        end_value=c.peak_lr * c.min_lr_ratio)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(c.clip_norm),
        optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
    )


# ----------------------------------------------------------------------------- loss / step
def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logits = logits_BxTxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return lse - picked


@dataclasses.dataclass(frozen=True)
class StepConfig:
    cfg: ModelConfig
    dtype: str = "float32"
    remat: str | None = None
    grad_accum: int = 1


def loss_sums(trainable: Params, frozen: Params, batch: Batch, sc: StepConfig, act_sharding=None):
    """(sum of weighted token NLL, sum of weights) for one (micro)batch."""
    params = merge_params(trainable, frozen)
    logits = forward(params, batch["inputs"], sc.cfg, batch["positions"], batch["segment_ids"],
                     dtype=as_dtype(sc.dtype), remat=sc.remat, act_sharding=act_sharding)
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(token_nll(logits, batch["targets"]) * w), jnp.sum(w)


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int = 0) -> dict[str, Any]:
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
            "rng": jax.random.key_data(jax.random.PRNGKey(seed))}


def _split_micro(batch: Batch, n: int) -> Batch:
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"grad_accum: batch size {x.shape[0]} is not divisible by {n} microbatches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map(f, batch)


def train_step(state: dict[str, Any], frozen: Params, batch: Batch, *, sc: StepConfig,
               tx: optax.GradientTransformation, act_sharding=None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(carry, mb):
        g_acc, l_acc, w_acc = carry
        (l, w), g = grad_fn(state["trainable"], frozen, mb, sc, act_sharding)
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if sc.grad_accum > 1:
        (g_sum, l_sum, w_sum), _ = jax.lax.scan(micro, init, _split_micro(batch, sc.grad_accum))
    else:
        (g_sum, l_sum, w_sum), _ = micro(init, batch)
    denom = jnp.maximum(w_sum, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, g_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": l_sum / denom, "tokens": w_sum, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics


def compile_step(sc: StepConfig, tx: optax.GradientTransformation, state_shardings=None, frozen_shardings=None,
                 batch_sharding=None, act_sharding=None, donate: bool = True) -> Callable:
    """jit the step with explicit in/out shardings (None: let jit decide, e.g. one device)."""
    step = functools.partial(train_step, sc=sc, tx=tx, act_sharding=act_sharding)
    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                  out_shardings=(state_shardings, None))
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kw)


# ----------------------------------------------------------------------------- accounting
def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def tree_size(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def flops_per_token(cfg: ModelConfig, n_layers: int, seq_len: int, lowest_trainable: int | None = None,
                    n_trainable_layers: int = 0, head_trainable: bool = False) -> dict[str, float]:
    """Training FLOPs per token, counted two ways (matmuls + attention, PaLM-style, causal
    attention not halved):

    - ``full``: 3 x forward, as if every weight were trained: the usual MFU numerator;
    - ``masked``: the work the masked step actually needs: the forward pass, activation
      gradients from the loss down to the lowest trainable layer, and weight gradients for
      the trainable layers only.
    """
    d, f, h, k, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.vocab_size)
    matmul = 2 * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)  # per layer, forward, per token
    attn = 2 * 2 * seq_len * h * hd
    head = 2 * d * v
    fwd = n_layers * (matmul + attn) + head
    full = 3 * fwd
    if lowest_trainable is None:
        return {"full": float(full), "masked": float(full)}
    act_grad = head + (n_layers - lowest_trainable) * (matmul + 2 * attn)
    weight_grad = n_trainable_layers * matmul + (head if head_trainable else 0)
    return {"full": float(full), "masked": float(fwd + act_grad + weight_grad)}
