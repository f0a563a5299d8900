"""Attention behind one function, :func:`attention`, with backends.

Shape suffixes as in :mod:`slayer_jax.modeling.model`: B batch, T query length, S key length, H query
heads, K kv heads (GQA: G = H // K query heads share one kv head), Dh head dim.

The mask is always the same one: a query sees a key when it is causal **by position**
(``kv_pos <= q_pos``), in the **same segment** (packed documents; 0 is padding) and, for Mistral,
inside the **sliding window** (``kv_pos > q_pos - sliding_window``). Backends:

- ``"xla"``: the reference, the einsum code that was ``model.dot_product_attention``, unchanged.
  It materialises fp32 scores [B, K, G, T, S] (and their gradient): O(T^2) memory per layer.
  It takes any [B, T, S] mask (``mask=``), so it also serves cross-length attention and the
  tree masks of :mod:`slayer_jax.evaluation.scoring`.
- ``"splash"``: TPU Pallas splash attention
  (``jax.experimental.pallas.ops.tpu.splash_attention``), a flash kernel with its own
  backward: O(T) memory. Causal mask (``CausalMask``) or, when ``sliding_window < T``, Mistral's
  window as ``LocalMask(window_size=(W - 1, 0))`` (causal plus the window), packed rows as
  ``SegmentIds``, and GQA natively: the MHA kernel maps query head h to kv head h // G, so K/V
  are never repeated in memory. On CPU it runs in Pallas interpret mode (the tests).
- ``"cudnn"``: the GPU kernel, cuDNN flash attention via
  ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``. Chosen because it is the
  only fused GPU attention reachable from this JAX that supports *both* packed segments and a
  sliding window, plus native GQA:
    * ``jax.nn.dot_product_attention(implementation="cudnn")`` calls that same kernel but its
      public signature has no segment ids (only per-row ``query_seq_lengths``, i.e. padding;
      a dense ``mask=`` becomes an O(T^2) bias). The private function it wraps takes
      ``q_offsets`` / ``kv_offsets`` with per-segment lengths (cuDNN sequence packing, needs
      cuDNN >= 9.6), which is what packed rows are: :func:`segment_offsets` converts segment ids.
      It takes ``sliding_window_length`` (same meaning as ours) and K < H heads directly.
    * The Pallas GPU kernel ``jax.experimental.pallas.ops.gpu.attention.mha`` has segment ids and
      causal, but no sliding window and no GQA (its K/V BlockSpec indexes the query head, so K/V
      would have to be repeated G times).
    * tokamax (0.0.17) can express segments+window (its internal ``Mask(k_start, k_end)``) but
      only through private API, and it pins ``typeguard==2.13.3`` and pulls qwix/pydantic/...:
      not worth a dependency for this.
  Limits: bf16/fp16 only (cuDNN has no fp32 flash path; ``"auto"`` stays on xla for fp32),
  head_dim <= 128 (256 on Hopper+ with recent cuDNN), T == S. Its numerical test
  (``@pytest.mark.gpu``) runs only where a GPU is; it was NOT run when this was written (no
  GPU was available): validate it before making it the GPU default.
- ``"auto"``: splash on TPU, cudnn on GPU (bf16/fp16), xla elsewhere; and xla whenever the
  kernel cannot take the shapes (T != S, T not a multiple of 128 for splash, an explicit
  ``mask=``). An explicitly named kernel backend raises instead of falling back.

The kernels assume packed-data positions: within a segment, positions increase by one per
token (``data.py`` restarts them at 0 per document), so causal-by-index inside a segment equals
the reference's causal-by-position, and the window counts tokens. Rows with gaps in positions
inside one segment need ``"xla"``.

Sharding: a Pallas kernel (and the cuDNN custom call with packing) must run per shard. When a
``mesh`` with the axes ``("data", "fsdp", "tensor")`` is given (``model.forward`` passes the mesh
of its ``act_sharding``), the kernel is wrapped in ``jax.shard_map``: batch over
``("data", "fsdp")``, query heads over ``"tensor"``; kv heads over ``"tensor"`` when
``K % tensor == 0``, else replicated and each shard slices the one kv head its query heads use
(needs ``tensor % K == 0``), as MaxText's attention_op does.

Where it is used: ``model.forward`` (training, evaluation), through :func:`model.self_attention`
with the ``attention=`` backend. In :mod:`slayer_jax.generate`, prefill and decode
(:func:`generate.cache_attention`) still call ``model.dot_product_attention`` (= :func:`xla_attention`):
prefill's left padding gives every padding token position 0 (not increasing), and decode attends
one query to a [B*K, Dh, S] / [B*K, S, Dh] cache whose layout the kernels do not take; a decode step is a
matrix-vector product with O(S) scores, so the flash kernels would save nothing there.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa
from jax.sharding import PartitionSpec as P

BACKENDS = ("auto", "xla", "splash", "cudnn")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
SPLASH_BLOCK = 512  # splash block size (q, kv and the backward blocks), capped at T


# ----------------------------------------------------------------------------- reference (xla)
def attention_mask(q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array, kv_seg_BxS: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool: causal by position, same segment, and inside the sliding window.

    Positions restart per packed document, but the segment test removes every cross-document
    pair, so within what remains position order equals token order.
    """
    qp, kp = q_pos_BxT[:, :, None], kv_pos_BxS[:, None, :]
    mask = (kp <= qp) & (q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :])
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    return mask


def xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxTxS, dtype) -> jax.Array:
    """The reference: einsum, fp32 scores [B, K, G, T, S], softmax, probs cast to ``dtype``. [B, T, H*Dh]."""
    B, T, H, Dh = q_BxTxHxDh.shape
    K = k_BxSxKxDh.shape[2]
    q = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxDh, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(Dh))
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh)
    return out.reshape(B, T, H * Dh)


# ----------------------------------------------------------------------------- backend choice
def platform_of(mesh: Any = None) -> str:
    """The platform attention runs on: the mesh's devices' (a deviceless TPU topology included), else the default."""
    if mesh is not None and hasattr(mesh, "devices"):
        return np.asarray(mesh.devices).flat[0].platform
    return jax.devices()[0].platform


def kernel_fits(backend: str, T: int, S: int, dtype: Any) -> str | None:
    """None if ``backend`` ("splash"/"cudnn") can take these shapes, else the reason it cannot."""
    if T != S:
        return f"query length {T} != key length {S} (the kernels do self-attention only)"
    if backend == "splash" and T % 128:
        return f"sequence length {T} is not a multiple of 128 (splash's kv block must be)"
    if backend == "cudnn" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: cuDNN flash attention takes bf16/fp16 only"
    return None


def resolve_backend(backend: str | None, T: int, S: int, dtype: Any, platform: str | None = None,
                    has_mask: bool = False) -> str:
    """The concrete backend ("xla", "splash" or "cudnn") for ``backend`` at these shapes.

    "auto" (or None) picks by platform and falls back to xla where the kernel cannot run; a
    named kernel that cannot run raises ValueError.
    """
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"attention: {backend!r} is not one of {BACKENDS}")
    if backend == "xla":
        return "xla"
    if backend == "auto":
        platform = platform or platform_of()
        kernel = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform)
        if kernel is None or has_mask or kernel_fits(kernel, T, S, dtype):
            return "xla"
        return kernel
    if has_mask:
        raise ValueError(f"attention: backend {backend!r} takes positions and segment ids, not an explicit mask")
    why = kernel_fits(backend, T, S, dtype)
    if why:
        raise ValueError(f"attention: backend {backend!r} cannot run here: {why}")
    return backend


# ----------------------------------------------------------------------------- splash (TPU)
def _splash_kernel(H: int, T: int, sliding_window: int | None, interpret: bool, block: int | None):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if sliding_window is not None and sliding_window < T:
        one = sa.LocalMask((T, T), window_size=(sliding_window - 1, 0), offset=0)  # causal + window
    else:
        one = sa.CausalMask((T, T))
    b = min(block or SPLASH_BLOCK, T)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, seg_BxT, *, sliding_window, dtype, interpret, block):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, Dh = q_BxTxHxDh.shape
    kernel = _splash_kernel(H, T, sliding_window, interpret, block)
    # splash has no scale argument: scale q (in fp32, then back to the compute dtype).
    q = (q_BxTxHxDh.astype(jnp.float32) * (1.0 / np.sqrt(Dh))).astype(q_BxTxHxDh.dtype)
    q_BxHxTxDh = q.transpose(0, 2, 1, 3)
    k_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3)
    v_BxKxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3)
    seg = seg_BxT.astype(jnp.int32)
    out_BxHxTxDh = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1)))(
        q_BxHxTxDh, k_BxKxSxDh, v_BxKxSxDh, seg)
    return out_BxHxTxDh.transpose(0, 2, 1, 3).astype(dtype)  # [B, T, H, Dh]


# ----------------------------------------------------------------------------- cuDNN (GPU)
def segment_offsets(seg_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN sequence packing from segment ids: (offsets [B, T+1], lengths [B, T]), int32, -1 padded.

    Every maximal run of equal ids is one segment (packed documents have distinct ids; padding
    is one more run). offsets[b, i] is the first token of row b's i-th run, lengths[b, i] its
    length; M = T is the static bound on runs per row.
    """
    B, T = seg_BxT.shape
    starts_BxT = jnp.concatenate([jnp.ones((B, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=T, fill_value=-1)[0])(starts_BxT).astype(jnp.int32)
    n_B = starts_BxT.sum(axis=1).astype(jnp.int32)
    i = jnp.arange(T, dtype=jnp.int32)[None, :]
    nxt = jnp.concatenate([first[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
    end = jnp.where(i < n_B[:, None] - 1, nxt, T)
    lengths = jnp.where(i < n_B[:, None], end - first, -1).astype(jnp.int32)
    offsets = jnp.concatenate([first, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths


def _cudnn_local(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, seg_BxT, *, sliding_window, dtype, interpret, block):
    del interpret, block

    T, Dh = q_BxTxHxDh.shape[1], q_BxTxHxDh.shape[3]
    offsets, lengths = segment_offsets(seg_BxT)
    window = sliding_window if sliding_window is not None and sliding_window < T else None
    out = cudnn_dpa(q_BxTxHxDh.astype(dtype), k_BxSxKxDh.astype(dtype), v_BxSxKxDh.astype(dtype), None, None,
                    lengths, lengths, offsets, offsets, scale=float(1.0 / np.sqrt(Dh)),
                    mask_type=MaskType.PADDING_CAUSAL, sliding_window_length=window)
    return out.astype(dtype)  # [B, T, H, Dh]


_KERNELS = {"splash": _splash_local, "cudnn": _cudnn_local}


# ----------------------------------------------------------------------------- per shard
def _mesh_axes(mesh) -> tuple[tuple[str, ...], str | None]:
    names = tuple(mesh.axis_names)
    batch = tuple(a for a in BATCH_AXES if a in names)
    head = HEAD_AXIS if HEAD_AXIS in names else None
    return batch, head


def _run_kernel(name, q, k, v, seg, *, sliding_window, dtype, interpret, block, mesh):
    local = functools.partial(_KERNELS[name], sliding_window=sliding_window, dtype=dtype, interpret=interpret,
                              block=block)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, seg)
    batch, head = _mesh_axes(mesh)
    H, K = q.shape[2], k.shape[2]
    t = mesh.shape[head] if head else 1
    if H % t:
        raise ValueError(f"attention: {H} query heads do not split over tensor={t}")
    kv_sharded = K % t == 0
    if not kv_sharded and t % K:
        raise ValueError(f"attention: {K} kv heads with tensor={t}: need K % tensor == 0 or tensor % K == 0")
    b_ax = batch if batch else None
    h_ax = head if t > 1 else None
    q_spec = P(b_ax, None, h_ax, None)
    kv_spec = P(b_ax, None, h_ax if kv_sharded else None, None)

    def per_shard(q1, k1, v1, s1):
        if not kv_sharded:  # this shard's H/t query heads all use kv head (first head) // G
            G = H // K
            kv = (jax.lax.axis_index(head) * (H // t)) // G
            k1 = jax.lax.dynamic_slice_in_dim(k1, kv, 1, axis=2)
            v1 = jax.lax.dynamic_slice_in_dim(v1, kv, 1, axis=2)
        return local(q1, k1, v1, s1)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(b_ax, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, seg)


# ----------------------------------------------------------------------------- the one function
def attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
              q_pos: jax.Array | None = None, kv_pos: jax.Array | None = None,
              q_seg: jax.Array | None = None, kv_seg: jax.Array | None = None,
              sliding_window: int | None = None, dtype: Any = jnp.float32, backend: str | None = "auto",
              mask: jax.Array | None = None, mesh: Any = None, interpret: bool | None = None,
              block_size: int | None = None) -> jax.Array:
    """Attention output [B, T, H*Dh] (``dtype``) for q [B, T, H, Dh], k and v [B, S, K, Dh].

    q_pos/kv_pos [B, T]/[B, S]: RoPE positions (default 0..T-1); q_seg/kv_seg: segment ids
    (default all 1); sliding_window: Mistral's window, None for none; dtype: the compute dtype.
    backend: one of :data:`BACKENDS` (see the module docstring). mask: an explicit [B, T, S]
    mask instead of positions/segments (xla only). mesh: run the kernel per shard of this
    ("data", "fsdp", "tensor") mesh; its devices' platform also decides "auto" and ``interpret``.
    interpret: Pallas interpret mode (default: off on TPU, on elsewhere). block_size: splash block size (default min(512, T)).
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
    if H % K:
        raise ValueError(f"attention: {H} query heads is not a multiple of {K} kv heads")
    name = resolve_backend(backend, T, S, dtype, platform=platform_of(mesh), has_mask=mask is not None)
    if name == "xla":
        if mask is None:
            q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if q_pos is None else q_pos
            kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)) if kv_pos is None else kv_pos
            q_seg = jnp.ones((B, T), jnp.int32) if q_seg is None else q_seg
            kv_seg = jnp.ones((B, S), jnp.int32) if kv_seg is None else kv_seg
            mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, sliding_window)
        return xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, dtype)
    # Self-attention kernels: one segment-id row (q_seg is kv_seg); positions only via token order.
    seg = q_seg if q_seg is not None else kv_seg
    seg = jnp.ones((B, T), jnp.int32) if seg is None else seg
    if interpret is None:
        interpret = platform_of(mesh) != "tpu"
    out = _run_kernel(name, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, seg, sliding_window=sliding_window, dtype=dtype,
                      interpret=interpret, block=block_size, mesh=mesh)
    return out.reshape(B, T, H * Dh)
