"""The masked, sharded train step: only the trainable subtree gets gradients and optimizer state.

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
import hashlib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.layout import FrozenLayoutStep, merge_for_forward, scan_runs, to_scan_layout
from slayer_jax.modeling.loss import loss_sums_from_hidden
from slayer_jax.modeling.model import Params, as_dtype, forward
from slayer_jax.parallel.sharding import batch_sharding, opt_state_specs, param_shardings, param_specs
from slayer_jax.surgery import ADAPTER_FACTORS, GROUPS

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
    lr_mult: tuple[tuple[str, float], ...] = ()  # (group, multiplier) pairs; a group not named gets 1
    wd_mult: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(cls, optim, total_steps: int) -> "OptimConfig":
        """From a config's ``optim`` block: the scalars, and ``lr_mult`` / ``wd_mult`` per group."""
        kw = {k: v for k, v in dict(optim).items() if k not in ("lr_mult", "wd_mult")}
        mults = {}
        for name in ("lr_mult", "wd_mult"):
            pairs = dict(optim.get(name, None) or {})
            for g, m in pairs.items():
                if g not in GROUPS:
                    raise SlayerError(f"config: optim.{name}.{g}: unknown group; expected one of {list(GROUPS)}")
                if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0 or not math.isfinite(m):
                    raise SlayerError(f"config: optim.{name}.{g}: {m!r}; expected a number >= 0")
            mults[name] = tuple(sorted((g, float(m)) for g, m in pairs.items() if m != 1))  # 1: as plain AdamW
        return cls(total_steps=int(total_steps), **kw, **mults)




def param_groups(tree: Params, layer_kinds: Sequence[str]) -> Params:
    """The optimizer group (:data:`slayer_jax.surgery.GROUPS`) of every leaf of ``tree`` (the
    trainable tree: ``None`` leaves stay ``None``), by provenance or role, never by a name match:
    a layer's leaves belong to its kind in the layer map (original, inserted, refreshed), a LoRA
    factor to "adapter", the rest to their role (embed, norm, lm_head)."""
    def group(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[0] != "layers":
            return keys[0]
        return "adapter" if keys[-1] in ADAPTER_FACTORS else layer_kinds[keys[1]]
    return jax.tree_util.tree_map_with_path(group, tree)


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    warmup = max(1, int(round(c.warmup_frac * c.total_steps))) if c.warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.peak_lr, warmup_steps=warmup, decay_steps=max(c.total_steps, warmup + 1),
        end_value=c.peak_lr * c.min_lr_ratio)


def _per_leaf(values: Params, fn) -> optax.GradientTransformation:
    """A stateless transform: each update leaf becomes ``fn(update, param, value)`` with its own
    constant ``value`` (a Python float, so a multiplier of 1 or a rate of 0 compiles to nothing)."""
    def update(updates, state, params=None):
        return jax.tree_util.tree_map(fn, updates, updates if params is None else params, values), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(c: OptimConfig, groups: Params | None = None) -> optax.GradientTransformation:
    """AdamW (optax's chain: adam, decoupled weight decay on kernels and embeddings, -lr) after
    global-norm clipping. Per group (``groups``: :func:`param_groups` of the trainable tree) the
    weight decay is scaled by ``c.wd_mult`` and the step by ``c.lr_mult``; with no multipliers it
    is ``optax.adamw`` exactly."""
    lr_mult, wd_mult = dict(c.lr_mult), dict(c.wd_mult)
    if groups is None and (lr_mult or wd_mult):
        raise ValueError("make_optimizer: lr_mult / wd_mult need the parameter groups")
    if wd_mult:
        rates = jax.tree_util.tree_map(lambda d, g: c.weight_decay * wd_mult.get(g, 1.0) if d else 0.0,
                                       decay_mask(groups), groups)
        decay = _per_leaf(rates, lambda u, p, r: u + r * p if r else u)
    else:
        decay = optax.add_decayed_weights(c.weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(c.clip_norm), optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps), decay,
             optax.scale_by_learning_rate(lr_schedule(c))]
    if lr_mult:
        mults = jax.tree_util.tree_map(lambda g: lr_mult.get(g, 1.0), groups)
        chain.append(_per_leaf(mults, lambda u, _, m: u * m if m != 1.0 else u))
    return optax.chain(*chain)


# ----------------------------------------------------------------------------- loss / step
@dataclasses.dataclass(frozen=True)
class StepConfig:
    cfg: ModelConfig
    dtype: str = "float32"
    remat: str | None = None
    grad_accum: int = 1
    attention: str = "auto"  # slayer_jax.modeling.attention.BACKENDS: splash on TPU, cuDNN on GPU (bf16), xla elsewhere
    loss_chunk: int = 0  # vocabulary columns per step of the chunked loss; 0 = full logits


def loss_sums(trainable: Params, frozen: Params, batch: Batch, sc: StepConfig, act_sharding=None):
    """(sum of weighted token NLL, sum of weights) for one (micro)batch."""
    params = merge_for_forward(trainable, frozen)  # frozen in the list or the scan layout (slayer_jax.modeling.layout)
    x = forward(params, batch["inputs"], sc.cfg, batch["positions"], batch["segment_ids"], dtype=as_dtype(sc.dtype),
                remat=sc.remat, act_sharding=act_sharding, attention=sc.attention, final_hidden=True)
    return loss_sums_from_hidden(x, params, sc.cfg, batch["targets"], batch["weights"], as_dtype(sc.dtype),
                                 chunk=sc.loss_chunk or None)


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


# ----------------------------------------------------------------------------- the step as it runs
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


@dataclasses.dataclass
class StepProgram:
    """The train step a run executes, built once by :func:`build_step` for ``slayer train``,
    ``slayer plan`` (on CPU devices or a TPU topology), the tests and the benchmarks, so what is
    planned is what runs: the optimizer, every sharding (parameters and optimizer state by the
    same role rules), and the jitted step."""

    mesh: Any
    sc: StepConfig
    ocfg: OptimConfig
    tx: optax.GradientTransformation
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    act_sharding: Any
    step: Callable  # jitted (state, frozen, batch) -> (state, metrics), state donated
    init: Callable  # jitted trainable -> state, placed by state_shardings

    def abstract_inputs(self, trainable, frozen, global_rows: int, seq_len: int):
        """``(state, frozen, batch)`` as ShapeDtypeStructs with their shardings: what the step is
        lowered for (no arrays needed)."""
        state = jax.eval_shape(self.init, trainable)
        place = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        batch = {k: jax.ShapeDtypeStruct((global_rows, seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                         sharding=self.batch_sharding) for k in BATCH_KEYS}
        return place(state, self.state_shardings), place(frozen, self.frozen_shardings), batch

    def lower(self, trainable, frozen, global_rows: int, seq_len: int):
        return self.step.lower(*self.abstract_inputs(trainable, frozen, global_rows, seq_len))


def build_step(c, cfg: ModelConfig, mesh, trainable, frozen, total_steps: int,
               layer_kinds: Sequence[str] | None = None) -> StepProgram:
    """The :class:`StepProgram` of config ``c`` for ``mesh`` (real devices, or a TPU topology's for
    an ahead-of-time compile). ``trainable``/``frozen`` may be arrays or ShapeDtypeStructs: only
    their shapes and dtypes are read. ``layer_kinds``: each layer's kind in the layer map, for the
    optimizer's per-group multipliers (``optim.lr_mult`` / ``optim.wd_mult``)."""
    ocfg = OptimConfig.from_config(c.optim, total_steps)
    groups = param_groups(trainable, layer_kinds) if layer_kinds is not None else None
    if groups is None and (ocfg.lr_mult or ocfg.wd_mult):
        raise SlayerError("config: optim.lr_mult / optim.wd_mult need the run's layer map")
    tx = make_optimizer(ocfg, groups)
    seed = int(c.get("seed", 0))
    rep = NamedSharding(mesh, PartitionSpec())
    tr_sh, fr_sh = param_shardings(trainable, mesh), param_shardings(frozen, mesh)
    opt_abs = jax.eval_shape(functools.partial(init_state, tx=tx, seed=seed), trainable)["opt_state"]
    opt_sh = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                    opt_state_specs(opt_abs, trainable, param_specs(trainable, mesh)),
                                    is_leaf=lambda x: isinstance(x, PartitionSpec))
    st_sh = {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}
    b_sh = batch_sharding(mesh)
    act_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    sc = StepConfig(cfg, dtype=c.dtype, remat=(c.get("remat", None) or None), grad_accum=int(c.get("grad_accum", 1)),
                    attention=c.get("attention", "auto") or "auto", loss_chunk=int(c.get("loss_chunk", 0) or 0))
    # The step reads the frozen tree in the scan layout (runs of identical frozen layers stacked, one
    # loop body each: slayer_jax.modeling.layout); frozen_shardings stay the list layout's, the interface.
    runs = scan_runs(frozen["layers"]) if c.get("scan_layers", False) else ()
    step_fr_sh = param_shardings(to_scan_layout(jax.eval_shape(lambda t: t, frozen), runs), mesh) if runs else fr_sh
    step = FrozenLayoutStep(compile_step(sc, tx, st_sh, step_fr_sh, b_sh, act_sh), runs, step_fr_sh, fr_sh)
    init = jax.jit(functools.partial(init_state, tx=tx, seed=seed), out_shardings=st_sh)
    return StepProgram(mesh, sc, ocfg, tx, st_sh, fr_sh, b_sh, act_sh, step, init)


def hlo_fingerprint(lowered) -> str:
    """sha256 of a lowered step's StableHLO text: equal fingerprints, equal programs."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


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


PEAK_FLOPS = {  # dense bf16 peak per device, for MFU
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "v5p": 459e12, "v5e": 197e12, "v5 lite": 197e12,
    "v6e": 918e12, "v6 lite": 918e12, "v4": 275e12,
}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for key, flops in PEAK_FLOPS.items():
        if key in kind:
            return flops
    return None
