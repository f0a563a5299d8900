"""The Llama/Mistral decoder over a plain list of layers.

One decoder block, :func:`block`, a function of one entry of ``params["layers"]``, serves every
mode (as MaxText's decoder layer does): its attention step is the mode ("train": the tokens among
themselves, :func:`self_attention`; "prefill" / "decode": through a KV cache,
:func:`slayer_jax.generate.cache_attention`), and its projections read the kernels in a weight
layout (:func:`dense`: "in_out" as stored here, or "out_in", the transposed copy a CPU
:class:`slayer_jax.generate.Generator` holds beside the params). One layer loop,
:func:`run_layers`, runs the list for :func:`forward`, prefill and decode, so any list length
works and surgery is list editing:

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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.modeling.attention import BACKENDS as ATTENTION_BACKENDS  # noqa: F401  (re-exported)
from slayer_jax.modeling.attention import attention, attention_mask, platform_of, resolve_backend, xla_attention
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.layout import STACKED, is_stacked, run_length

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


# ----------------------------------------------------------------------------- the block
MODES = ("train", "prefill", "decode")  # what a block's attention step does; see block()
KERNELS = ("in_out", "out_in")  # how a layout stores projection kernels; see dense()


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float, dtype: Any) -> jax.Array:
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # HF casts back to the input dtype before the (weight *) multiply.
    return scale_D.astype(dtype) * x32.astype(dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with its scale as the flax param ``scale`` (the final norm's ``.apply``)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), jnp.float32)
        return rms_norm(x_BxTxD, scale, self.eps, self.dtype)


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb_BxTxDh = jnp.concatenate([freqs_BxTxHalf, freqs_BxTxHalf], axis=-1)
    return jnp.cos(emb_BxTxDh).astype(dtype), jnp.sin(emb_BxTxDh).astype(dtype)


def apply_rope(x_BxTxNxDh: jax.Array, cos_BxTxDh: jax.Array, sin_BxTxDh: jax.Array) -> jax.Array:
    half = x_BxTxNxDh.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxDh[..., half:], x_BxTxNxDh[..., :half]], axis=-1)
    return x_BxTxNxDh * cos_BxTxDh[:, :, None, :] + rotated * sin_BxTxDh[:, :, None, :]


# The mask and the reference einsum attention live in slayer_jax.modeling.attention (with the kernel
# backends); this name stays for the benches (bench/train_step_probe.py swaps it).
dot_product_attention = xla_attention


def dense(proj: Params, x_BxTxI: jax.Array, dtype: Any, kernels: str = "in_out") -> jax.Array:
    """One projection ``{"kernel", "bias"?, LoRA "lora_a", "lora_b", "lora_scale"?}`` of x [..., in] -> [..., out],
    as ``flax.linen.Dense`` (plus ``lora_scale * x @ lora_a @ lora_b`` where an adapter is present).

    kernels: how the kernel is stored. "in_out": [in, out], as in params (x @ kernel). "out_in":
    [out, in], a decode layout's transposed copy, multiplied weights first (kernel @ x^T: the
    activations are the columns), the orientation XLA:CPU runs about twice as fast with a few rows.
    """
    x, w = x_BxTxI.astype(dtype), proj["kernel"].astype(dtype)
    if kernels == "in_out":
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    else:
        y = jnp.moveaxis(jax.lax.dot_general(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)
    if "lora_a" in proj:  # a LoRA adapter beside the frozen kernel: y += scale * (x @ A) @ B
        if kernels != "in_out":
            raise ValueError("dense: a LoRA adapter in a decode layout; merge it first (merge_adapters)")
        y = y + proj["lora_scale"].astype(dtype) * ((x @ proj["lora_a"].astype(dtype)) @ proj["lora_b"].astype(dtype))
    return y + proj["bias"].astype(dtype) if "bias" in proj else y


def merge_adapters(params: Params) -> Params:
    """Every LoRA adapter folded into its kernel (kernel + scale * A @ B, in fp32, back to the
    kernel's dtype) and removed: the plain model an HF export or a decode layout holds."""
    def merge(proj):
        if not isinstance(proj, dict) or "lora_a" not in proj:
            return proj
        k = proj["kernel"]
        delta = proj["lora_scale"].astype(jnp.float32) * (proj["lora_a"].astype(jnp.float32)
                                                          @ proj["lora_b"].astype(jnp.float32))
        return {n: v for n, v in proj.items() if not n.startswith("lora_")} | {
            "kernel": (k.astype(jnp.float32) + delta).astype(k.dtype)}
    if not any("lora_a" in p for layer in params["layers"] for p in layer.values() if isinstance(p, dict)):
        return params
    return dict(params, layers=[{n: merge(p) for n, p in layer.items()} for layer in params["layers"]])


def block(cfg: ModelConfig, dtype: Any, layer: Params, x_BxTxD, cos_BxTxDh, sin_BxTxDh, attend, kv=None,
          kernels: str = "in_out"):
    """The pre-norm Llama block, x + attn(norm(x)); x + mlp(norm(x)), for every mode and layout.

    layer: one entry of ``params["layers"]`` (kernels "in_out"), or the same tree with its kernels
    stored [out, in] (kernels "out_in", see :func:`dense`). attend(q [B,T,H,Dh], k and v [B,T,K,Dh],
    kv) -> (attention output [B, T, H*Dh], kv) is the mode: "train" attends the T tokens to
    each other (:func:`self_attention`); "prefill" and "decode" also write k, v into ``kv``, the
    layer's KV cache, and read it (:func:`slayer_jax.generate.cache_attention`).
    Returns (x [B, T, D], kv).
    """
    H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    B, T, _ = x_BxTxD.shape

    def proj(name, h):
        return dense(layer[name], h, dtype, kernels)

    h = rms_norm(x_BxTxD, layer["attn_norm"]["scale"], eps, dtype)
    q, k, v = (proj(n + "_proj", h).reshape(B, T, N, Dh) for n, N in (("q", H), ("k", K), ("v", K)))
    attn_BxTxHDh, kv = attend(apply_rope(q, cos_BxTxDh, sin_BxTxDh), apply_rope(k, cos_BxTxDh, sin_BxTxDh), v, kv)
    x_BxTxD = x_BxTxD + proj("o_proj", attn_BxTxHDh)
    h = rms_norm(x_BxTxD, layer["mlp_norm"]["scale"], eps, dtype)
    gate, up = proj("gate_proj", h), proj("up_proj", h)
    return x_BxTxD + proj("down_proj", jax.nn.silu(gate) * up), kv


def self_attention(cfg: ModelConfig, dtype: Any, mask_BxTxS, positions_BxT=None, segment_ids_BxT=None,
                   backend: str = "xla", mesh: Any = None):
    """The "train" mode's attend for :func:`block`: the T tokens among themselves, no cache.

    backend: the :func:`slayer_jax.modeling.attention.attention` backend. "xla" reads ``mask_BxTxS``, any
    [B, T, S] mask; a kernel backend ("splash", "cudnn", "auto") reads ``positions_BxT`` and
    ``segment_ids_BxT`` instead (``mask_BxTxS`` may then be None). mesh: the ("data", "fsdp",
    "tensor") mesh the kernel runs per shard of (None: unsharded).
    """
    def attend(q, k, v, kv):
        if backend == "xla":
            return dot_product_attention(q, k, v, mask_BxTxS, dtype), kv
        return attention(q, k, v, q_pos=positions_BxT, kv_pos=positions_BxT, q_seg=segment_ids_BxT,
                         kv_seg=segment_ids_BxT, sliding_window=cfg.sliding_window, dtype=dtype, backend=backend,
                         mesh=mesh), kv
    return attend


def run_layers(layers: list, x_BxTxD, step, caches: list | None = None, collect: bool = False):
    """The layer loop of every mode: x through each entry of ``layers`` in order.

    step(layer, x, cache) -> (x, cache) runs one block; ``caches`` is one entry per layer (its KV
    cache) or None. An entry that is a stacked run of k layers (:mod:`slayer_jax.modeling.layout`) runs as
    ``jax.lax.scan`` of the same step (its k caches stacked for the scan).
    Returns (x, the new caches or None, and if ``collect`` the residual states: entry l is layer
    l's input, the last one the last layer's output).
    """
    hidden, new, i = [x_BxTxD], [], 0

    def scan_body(x, layer_cache):
        y, c = step(layer_cache[0], x, layer_cache[1])
        return y, (c, y if collect else None)

    for entry in layers:
        if is_stacked(entry):
            n = run_length(entry)
            cs = None if caches is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *caches[i:i + n])
            x_BxTxD, (cs, ys) = jax.lax.scan(scan_body, x_BxTxD, (entry[STACKED], cs))
            new += [None] * n if cs is None else [jax.tree_util.tree_map(lambda a, j=j: a[j], cs) for j in range(n)]
            hidden += [ys[j] for j in range(n)] if collect else []
        else:
            n = 1
            x_BxTxD, c = step(entry, x_BxTxD, None if caches is None else caches[i])
            new.append(c)
            hidden.append(x_BxTxD)
        i += n
    return x_BxTxD, (new if caches is not None else None), (hidden if collect else None)


# ----------------------------------------------------------------------------- forward
def _block_fn(cfg: ModelConfig, dtype: Any, remat: str | None, attention: str = "xla", mesh: Any = None):
    def run(layer_params, x, cos, sin, mask, pos=None, seg=None):
        return block(cfg, dtype, layer_params, x, cos, sin, self_attention(cfg, dtype, mask, pos, seg, attention,
                                                                           mesh))[0]

    if remat in (None, "none"):
        return run
    if remat == "full":
        return jax.checkpoint(run)
    if remat == "save_dots":
        return jax.checkpoint(run, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat: {remat!r} is not one of {REMAT_POLICIES}")


def embed(params: Params, tokens_BxT: jax.Array, dtype: Any) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], tokens_BxT, axis=0).astype(dtype)


def unembed(params: Params, cfg: ModelConfig, x_BxTxD: jax.Array, dtype: Any, head_VxD: jax.Array | None = None
            ) -> jax.Array:
    """Logits [B, T, V] (float32): final norm, then the lm_head kernel or the tied embedding.

    head_VxD: a decode layout's output projection [V, D] (the tied embedding, or the lm_head kernel
    transposed once), multiplied weights first as :func:`dense` does with "out_in" kernels.
    """
    x = rms_norm(x_BxTxD, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
    if head_VxD is not None:
        lg_VxBxT = jax.lax.dot_general(head_VxD.astype(dtype), x, (((1,), (2,)), ((), ())),
                                       preferred_element_type=jnp.float32)
        return jnp.moveaxis(lg_VxBxT, 0, -1)
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
    (:mod:`slayer_jax.modeling.layout`'s scan layout, leaves with a leading axis k), run as ``jax.lax.scan``
    of the same block (same remat policy and activation constraint per layer).

    positions_BxT: per-token RoPE positions (default 0..T-1; restart per packed document).
    segment_ids_BxT: packed-document ids; tokens attend only within their own id. Use 0 for
        padding (padding then only attends to padding, never to real tokens).
    dtype: compute dtype. Parameters keep their own dtype (e.g. fp32 masters) and are cast.
    remat: None/"none", "full" or "save_dots", applied per block.
    final_hidden: return only the last layer's output [B, T, D] (before the final norm), no
        logits: the chunked loss (:mod:`slayer_jax.modeling.loss`) takes it from there.
    return_hidden: also return the list of residual-stream states, entry l being layer l's
        input and entry L the last layer's output (before the final norm).
    act_sharding: optional sharding for the [B, T, D] residual stream, applied as a
        constraint after the embedding and after every block (batch over data+fsdp).
    attention: the attention backend, one of :data:`slayer_jax.modeling.attention.BACKENDS`: "auto"
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
    block_fn = _block_fn(cfg, dtype, remat, backend, mesh)

    constrain = (lambda y: y) if act_sharding is None else (
        lambda y: jax.lax.with_sharding_constraint(y, act_sharding))

    def step(layer, x, cache):
        return constrain(block_fn(layer, x, cos, sin, mask, positions_BxT, segment_ids_BxT)), cache

    x, _, hidden = run_layers(params["layers"], constrain(embed(params, tokens_BxT, dtype)), step,
                              collect=return_hidden)
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
