"""slayer_jax.modeling.attention: every backend that can run here equals the xla reference, forward and gradients.

Splash runs in Pallas interpret mode on CPU (the kernel's own code, its own backward). The cuDNN
numerical test needs a GPU; the TPU compile check needs libtpu (deviceless: no TPU needed).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slayer_jax.modeling import attention as A
from slayer_jax.modeling import model as M
from slayer_jax.modeling.config import ModelConfig

ON_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU")
tpu_compile = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="deviceless TPU compile needs libtpu")

H, DH = 4, 64


def _packed(B, T, lengths_per_row):
    """Segment ids (1, 2, ...) and positions restarting at 0 per segment; [B, T] int32 each."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == T
        c = 0
        for i, n in enumerate(lengths):
            seg[b, c:c + n], pos[b, c:c + n] = i + 1, np.arange(n)
            c += n
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(B, T, K, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, H, DH)).astype(dtype), jax.random.normal(kk, (B, T, K, DH)).astype(dtype),
            jax.random.normal(kv, (B, T, K, DH)).astype(dtype))


def _loss(backend, kw, w):
    def f(q, k, v):
        return jnp.sum(A.attention(q, k, v, backend=backend, **kw).astype(jnp.float32) * w)
    return f


def _compare(q, k, v, kw, tol, backend="splash"):
    """Forward and d/d(q, k, v) of a fixed random projection of the output: backend vs xla."""
    B, T = q.shape[:2]
    w = jax.random.normal(jax.random.PRNGKey(9), (B, T, H * DH))
    ref = A.attention(q, k, v, backend="xla", **kw)
    out = A.attention(q, k, v, backend=backend, **kw)
    assert out.shape == (B, T, H * DH) and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    g_ref = jax.grad(_loss("xla", kw, w), (0, 1, 2))(q, k, v)
    g_out = jax.grad(_loss(backend, kw, w), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_out, g_ref):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))  # gradients are O(10): compare relative to it
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale,
                                   rtol=0, atol=tol, err_msg=f"d/d{name}")


@pytest.mark.parametrize("K", [1, 2, 4])
def test_splash_causal_gqa_fp32(K):
    """Causal, one document per row, GQA with 1 (MQA), 2 and 4 (MHA) kv heads, head_dim 64."""
    q, k, v = _qkv(1, 128, K, jnp.float32, seed=K)
    seg, pos = _packed(1, 128, [[128]])
    _compare(q, k, v, dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, dtype=jnp.float32), 1e-5)


def test_splash_packed_sliding_window_fp32():
    """Several documents per row (positions restart), a window shorter than the sequence and than
    some documents, two 128-blocks each way (the block-sparse skipping is exercised)."""
    T = 256
    seg, pos = _packed(2, T, [[100, 60, 96], [17, 239]])
    q, k, v = _qkv(2, T, 2, jnp.float32)
    _compare(q, k, v, dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, sliding_window=70, dtype=jnp.float32,
                           block_size=128), 1e-5)


def test_splash_packed_window_bf16():
    """bf16 inputs and compute dtype. The two differ by design: xla rounds the probabilities to
    bf16 before the PV matmul and scales fp32 scores, splash keeps p in fp32 and scales q in bf16;
    measured: forward max abs error 1.6e-2 on outputs up to 3.3 (one bf16 ulp at 2-4), gradients
    within 5e-3 of their max. Bounded here by 3e-2 (absolute, and relative to each gradient's max)."""
    T = 256
    seg, pos = _packed(1, T, [[80, 176]])
    q, k, v = _qkv(1, T, 2, jnp.bfloat16, seed=3)
    _compare(q, k, v, dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, sliding_window=100, dtype=jnp.bfloat16,
                           block_size=128), 3e-2)


@pytest.mark.parametrize("K", [1, 4])
def test_splash_sharded(K):
    """Per shard under shard_map: batch over data, heads over tensor; K=4 shards the kv heads,
    K=1 replicates the one kv head on every tensor shard."""
    from slayer_jax.parallel.sharding import make_mesh

    mesh = make_mesh("data=2,fsdp=1,tensor=2", devices=jax.devices()[:4])
    seg, pos = _packed(2, 128, [[50, 78], [128]])
    q, k, v = _qkv(2, 128, K, jnp.float32, seed=5)
    kw = dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, sliding_window=40, dtype=jnp.float32)
    ref = A.attention(q, k, v, backend="xla", **kw)
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, backend="splash", mesh=mesh, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_model_forward_splash_equals_xla():
    """The whole model with backend=splash equals backend=xla: explicit head_dim 64 with hidden
    96 != 4 * 64, GQA 2 kv heads, a sliding window, packed rows."""
    cfg = ModelConfig(vocab_size=64, hidden_size=96, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, sliding_window=48, model_type="mistral")
    params = M.init_params(cfg, 2, jax.random.PRNGKey(0), std=0.2)
    seg, pos = _packed(2, 128, [[70, 58], [128]])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 128), 0, cfg.vocab_size)
    ref = M.forward(params, tokens, cfg, pos, seg, attention="xla")
    out = M.forward(params, tokens, cfg, pos, seg, attention="splash")
    assert float(jnp.max(jnp.abs(ref))) > 1.0  # the logits are not trivially small
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_resolve_backend():
    assert A.resolve_backend("auto", 256, 256, jnp.float32, platform="cpu") == "xla"
    assert A.resolve_backend("auto", 256, 256, jnp.bfloat16, platform="tpu") == "splash"
    assert A.resolve_backend("auto", 100, 100, jnp.bfloat16, platform="tpu") == "xla"  # not a multiple of 128
    assert A.resolve_backend("auto", 256, 256, jnp.bfloat16, platform="gpu") == "cudnn"
    assert A.resolve_backend("auto", 256, 256, jnp.float32, platform="gpu") == "xla"  # cuDNN has no fp32
    assert A.resolve_backend("auto", 1, 256, jnp.bfloat16, platform="tpu") == "xla"  # decode-like
    with pytest.raises(ValueError, match="multiple of 128"):
        A.resolve_backend("splash", 100, 100, jnp.float32)
    with pytest.raises(ValueError, match="not one of"):
        A.resolve_backend("flash", 128, 128, jnp.float32)
    assert M.forward.__kwdefaults__["attention"] == "auto"


def test_segment_offsets_describe_the_runs():
    """cuDNN packing arrays: rebuilding 'same run' from offsets/lengths gives the segment test."""
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3], [0, 0, 5, 5, 5, 5, 5, 5], [4] * 8], jnp.int32)
    offsets, lengths = A.segment_offsets(seg)
    assert offsets.shape == (3, 9) and lengths.shape == (3, 8)
    np.testing.assert_array_equal(offsets[0, :4], [0, 3, 5, -1])
    np.testing.assert_array_equal(lengths[0, :4], [3, 2, 3, -1])
    np.testing.assert_array_equal(lengths[1, :3], [2, 6, -1])
    np.testing.assert_array_equal(lengths[2, :2], [8, -1])
    for b in range(3):
        run = np.full(8, -1)
        for i, (o, n) in enumerate(zip(np.asarray(offsets[b]), np.asarray(lengths[b]))):
            if n >= 0:
                run[o:o + n] = i
        assert (run >= 0).all()
        np.testing.assert_array_equal(run[:, None] == run[None, :], np.asarray(seg[b][:, None] == seg[b][None, :]))


@gpu
@pytest.mark.parametrize("K", [1, 2, 4])
def test_cudnn_equals_xla_bf16(K):
    T = 256
    seg, pos = _packed(2, T, [[100, 60, 96], [17, 239]])
    q, k, v = _qkv(2, T, K, jnp.bfloat16, seed=K)
    _compare(q, k, v, dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, sliding_window=70, dtype=jnp.bfloat16),
             3e-2, backend="cudnn")


def _v5p_mesh():
    from slayer_jax.parallel.sharding import make_mesh
    from slayer_jax.training.aot import accelerator, tpu_devices

    return make_mesh("data=4", devices=tpu_devices(accelerator("v5p-8")))


def _layer_temp_bytes(mesh, backend, T=1024):
    """The TPU compiler's estimate of temporaries for forward+backward of a one-layer tiny model
    (4 heads x 128, 2 kv heads, bf16 compute, packed rows), compiled deviceless for ``mesh``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=128)
    B = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                                    M.expected_shapes(cfg, 1))
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows)

    def loss(p, tokens, pos, seg):
        logits = M.forward(p, tokens, cfg, pos, seg, dtype=jnp.bfloat16, act_sharding=act, attention=backend)
        return jnp.mean(logits)

    compiled = jax.jit(jax.grad(loss)).lower(params, ints, ints, ints).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@tpu_compile
def test_tpu_splash_temporaries_below_xla():
    """Deviceless v5p compile (the TPU compiler's figures): one layer's forward+backward with
    splash needs fewer temporaries than with xla (the [B, K, G, T, S] fp32 scores are gone)."""
    mesh = _v5p_mesh()
    xla, splash = _layer_temp_bytes(mesh, "xla"), _layer_temp_bytes(mesh, "splash")
    assert splash < xla / 2, (splash, xla)
