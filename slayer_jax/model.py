"""The Flax Llama/Mistral decoder over a plain list of layers.

One decoder block is a Flax linen module (:class:`DecoderBlock`) whose parameter dict is one
entry of ``params["layers"]``. The decoder itself is a Python loop over that list, so any
list length works and surgery is list editing:

    params = {
      "embed":   {"embedding": [vocab, d]},
      "layers":  [ {"attn_norm": {"scale": [d]},
                    "q_proj": {"kernel": [d, H*Dh]}, "k_proj": {"kernel": [d, K*Dh]},
                    "v_proj": {"kernel": [d, K*Dh]}, "o_proj": {"kernel": [H*Dh, d]},
                    "mlp_norm": {"scale": [d]},
                    "gate_proj": {"kernel": [d, F]}, "up_proj": {"kernel": [d, F]},
                    "down_proj": {"kernel": [F, d]}}, ... ],        # plain list
      "norm":    {"scale": [d]},
      "lm_head": {"kernel": [d, vocab]},                            # absent when tied
    }

Kernels are stored [in, out] (Flax convention); HF stores [out, in]. Projections gain a
``"bias"`` leaf when ``attention_bias`` / ``mlp_bias`` is set.

Shape suffixes: B batch, T query length, S key length, D model width, H query heads,
K kv heads, G = H // K, Dh head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.attention import BACKENDS as ATTENTION_BACKENDS  # noqa: F401  (re-exported)
from slayer_jax.attention import attention, attention_mask, platform_of, resolve_backend, xla_attention
from slayer_jax.config import ModelConfig
from slayer_jax.layout import STACKED, is_stacked

Params = dict[str, Any]
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}
REMAT_POLICIES = ("none", "full", "save_dots")


def as_dtype(d: Any) -> Any:
    if isinstance(d, str):
        if d not in DTYPES:
            raise ValueError(f"dtype: {d!r} is not one of {sorted(DTYPES)}")
        return DTYPES[d]
    return d


def num_layers(params: Params) -> int:
    return len(params["layers"])


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), jnp.float32)
        x32 = x_BxTxD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the (weight *) multiply.
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb_BxTxDh = jnp.concatenate([freqs_BxTxHalf, freqs_BxTxHalf], axis=-1)
    return jnp.cos(emb_BxTxDh).astype(dtype), jnp.sin(emb_BxTxDh).astype(dtype)


def apply_rope(x_BxTxNxDh: jax.Array, cos_BxTxDh: jax.Array, sin_BxTxDh: jax.Array) -> jax.Array:
    half = x_BxTxNxDh.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxDh[..., half:], x_BxTxNxDh[..., :half]], axis=-1)
    return x_BxTxNxDh * cos_BxTxDh[:, :, None, :] + rotated * sin_BxTxDh[:, :, None, :]


# The mask and the reference einsum attention live in slayer_jax.attention (with the kernel
# backends); these names stay for generate.py, scoring.py and the benches.
dot_product_attention = xla_attention


def block_qkv(cfg: ModelConfig, dt: Any, x_BxTxD, cos_BxTxDh, sin_BxTxDh):
    """The attention half's prologue: norm, q/k/v projections, RoPE -> q [B,T,H,Dh], k and v [B,T,K,Dh].

    Called inside a block's compact ``__call__`` (the submodules become the block's params), so every
    block variant (training, KV-cache decoding) shares this code and the same parameter names.
    """
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B, T, _ = x_BxTxD.shape
    dense = functools.partial(nn.Dense, dtype=dt, param_dtype=jnp.float32, use_bias=cfg.attention_bias)
    h = RMSNorm(cfg.rms_norm_eps, dt, name="attn_norm")(x_BxTxD)
    q = dense(H * Dh, name="q_proj")(h).reshape(B, T, H, Dh)
    k = dense(K * Dh, name="k_proj")(h).reshape(B, T, K, Dh)
    v = dense(K * Dh, name="v_proj")(h).reshape(B, T, K, Dh)
    return apply_rope(q, cos_BxTxDh, sin_BxTxDh), apply_rope(k, cos_BxTxDh, sin_BxTxDh), v


def block_epilogue(cfg: ModelConfig, dt: Any, x_BxTxD, attn_BxTxHDh):
    """The rest of a block after attention: o_proj residual, then norm + SwiGLU MLP residual."""
    dense = functools.partial(nn.Dense, dtype=dt, param_dtype=jnp.float32)
    x_BxTxD = x_BxTxD + dense(cfg.hidden_size, use_bias=cfg.attention_bias, name="o_proj")(attn_BxTxHDh)
    h = RMSNorm(cfg.rms_norm_eps, dt, name="mlp_norm")(x_BxTxD)
    gate = dense(cfg.intermediate_size, use_bias=cfg.mlp_bias, name="gate_proj")(h)
    up = dense(cfg.intermediate_size, use_bias=cfg.mlp_bias, name="up_proj")(h)
    return x_BxTxD + dense(cfg.hidden_size, use_bias=cfg.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)); x + mlp(norm(x)). Its params are one list entry.

    attention: the :func:`slayer_jax.attention.attention` backend. "xla" (the default here) reads
    ``mask_BxTxS``, any [B, T, S] mask; a kernel backend ("splash", "cudnn", "auto") reads
    ``positions_BxT`` and ``segment_ids_BxT`` instead (``mask_BxTxS`` may then be None).
    mesh: the ("data", "fsdp", "tensor") mesh the kernel runs per shard of (None: unsharded).
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"
    mesh: Any = None

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, mask_BxTxS, positions_BxT=None, segment_ids_BxT=None):
        q, k, v = block_qkv(self.cfg, self.dtype, x_BxTxD, cos_BxTxDh, sin_BxTxDh)
        if self.attention == "xla":
            attn = dot_product_attention(q, k, v, mask_BxTxS, self.dtype)
        else:
            attn = attention(q, k, v, q_pos=positions_BxT, kv_pos=positions_BxT, q_seg=segment_ids_BxT,
                             kv_seg=segment_ids_BxT, sliding_window=self.cfg.sliding_window, dtype=self.dtype,
                             backend=self.attention, mesh=self.mesh)
        return block_epilogue(self.cfg, self.dtype, x_BxTxD, attn)


# ----------------------------------------------------------------------------- forward
def _block_fn(cfg: ModelConfig, dtype: Any, remat: str | None, attention: str = "xla", mesh: Any = None):
    block = DecoderBlock(cfg, dtype, attention, mesh)

    def run(layer_params, x, cos, sin, mask, pos=None, seg=None):
        return block.apply({"params": layer_params}, x, cos, sin, mask, pos, seg)

    if remat in (None, "none"):
        return run
    if remat == "full":
        return jax.checkpoint(run)
    if remat == "save_dots":
        return jax.checkpoint(run, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat: {remat!r} is not one of {REMAT_POLICIES}")


def embed(params: Params, tokens_BxT: jax.Array, dtype: Any) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], tokens_BxT, axis=0).astype(dtype)


def unembed(params: Params, cfg: ModelConfig, x_BxTxD: jax.Array, dtype: Any) -> jax.Array:
    x = RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": params["norm"]}, x_BxTxD)
    if "lm_head" in params:
        w_DxV = params["lm_head"]["kernel"].astype(dtype)
        return jnp.einsum("btd,dv->btv", x, w_DxV, preferred_element_type=jnp.float32)
    w_VxD = params["embed"]["embedding"].astype(dtype)
    return jnp.einsum("btd,vd->btv", x, w_VxD, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    cfg: ModelConfig,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    *,
    dtype: Any = jnp.float32,
    remat: str | None = None,
    return_hidden: bool = False,
    final_hidden: bool = False,
    act_sharding: Any = None,
    attention: str | None = "auto",
):
    """Logits [B, T, V] (float32) for any ``len(params["layers"])``.

    An entry of ``params["layers"]`` is one layer's dict, or a stacked run of identical layers
    (:mod:`slayer_jax.layout`'s scan layout, leaves with a leading axis k), run as ``jax.lax.scan``
    of the same block (same remat policy and activation constraint per layer).

    positions_BxT: per-token RoPE positions (default 0..T-1; restart per packed document).
    segment_ids_BxT: packed-document ids; tokens attend only within their own id. Use 0 for
        padding (padding then only attends to padding, never to real tokens).
    dtype: compute dtype. Parameters keep their own dtype (e.g. fp32 masters) and are cast.
    remat: None/"none", "full" or "save_dots", applied per block.
    final_hidden: return only the last layer's output [B, T, D] (before the final norm), no
        logits: the chunked loss (:mod:`slayer_jax.loss`) takes it from there.
    return_hidden: also return the list of residual-stream states, entry l being layer l's
        input and entry L the last layer's output (before the final norm).
    act_sharding: optional sharding for the [B, T, D] residual stream, applied as a
        constraint after the embedding and after every block (batch over data+fsdp).
    attention: the attention backend, one of :data:`slayer_jax.attention.BACKENDS`: "auto"
        (splash on TPU, cuDNN on GPU for bf16/fp16, xla elsewhere or where the kernel cannot take
        the shapes), "xla", "splash" or "cudnn". Kernels run per shard of ``act_sharding``'s mesh.
    """
    dtype = as_dtype(dtype)
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    cos, sin = rope_cos_sin(positions_BxT, cfg.rope_inv_freq(), dtype)
    mesh = getattr(act_sharding, "mesh", None)
    backend = resolve_backend(attention, T, T, dtype, platform=platform_of(mesh))
    if backend == "xla":
        mask = attention_mask(positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT, cfg.sliding_window)
    else:
        mask = None  # the kernels build the mask from positions (token order) and segment ids
    block = _block_fn(cfg, dtype, remat, backend, mesh)

    constrain = (lambda y: y) if act_sharding is None else (
        lambda y: jax.lax.with_sharding_constraint(y, act_sharding))

    def layer_step(x, layer):
        return constrain(block(layer, x, cos, sin, mask, positions_BxT, segment_ids_BxT))

    def scan_body(x, layer):
        y = layer_step(x, layer)
        return y, (y if return_hidden else None)

    x = constrain(embed(params, tokens_BxT, dtype))
    hidden = [x]
    for entry in params["layers"]:
        if is_stacked(entry):  # a run of k frozen layers (slayer_jax.layout): one loop body, k trips
            x, ys = jax.lax.scan(scan_body, x, entry[STACKED])
            if return_hidden:
                hidden.extend(ys[i] for i in range(ys.shape[0]))
        else:
            x = layer_step(x, entry)
            if return_hidden:
                hidden.append(x)
    if final_hidden:  # the last layer's output, before the final norm: for a loss that never forms [B, T, V]
        return x
    logits = unembed(params, cfg, x, dtype)
    return (logits, hidden) if return_hidden else logits


# ----------------------------------------------------------------------------- init
def init_layer(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> Params:
    """Random params for one block, with the same tree as imported weights."""
    D, H, K, Dh, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.intermediate_size)
    shapes = {"q_proj": (D, H * Dh), "k_proj": (D, K * Dh), "v_proj": (D, K * Dh), "o_proj": (H * Dh, D),
              "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    keys = jax.random.split(key, len(shapes))
    layer: Params = {"attn_norm": {"scale": jnp.ones((D,), dtype)}, "mlp_norm": {"scale": jnp.ones((D,), dtype)}}
    for k_, (name, shape) in zip(keys, shapes.items()):
        layer[name] = {"kernel": (std * jax.random.normal(k_, shape, jnp.float32)).astype(dtype)}
        has_bias = cfg.attention_bias if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else cfg.mlp_bias
        if has_bias:
            layer[name]["bias"] = jnp.zeros((shape[1],), dtype)
    return layer


def init_params(cfg: ModelConfig, n_layers: int, key: jax.Array, dtype: Any = jnp.float32,
                std: float = 0.02) -> Params:
    dtype = as_dtype(dtype)
    k_embed, k_head, *k_layers = jax.random.split(key, n_layers + 2)
    params: Params = {
        "embed": {"embedding": (std * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size))).astype(dtype)},
        "layers": [init_layer(cfg, k, dtype, std) for k in k_layers],
        "norm": {"scale": jnp.ones((cfg.hidden_size,), dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": (std * jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))).astype(dtype)}
    return params


def expected_shapes(cfg: ModelConfig, n_layers: int) -> Params:
    """The params tree of shapes for ``cfg`` with ``n_layers`` blocks (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, n_layers, jax.random.PRNGKey(0)))


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
