"""slayer_jax.modeling.loss: the vocabulary-chunked token NLL equals the plain one, values and gradients.

Tolerances. fp32: the chunked and plain paths multiply the same operands; they differ only in
the order of fp32 reductions (streaming logsumexp, d(hidden) summed over chunks), so sums agree
to rtol 2e-6 and gradients elementwise to rtol 1e-5 / atol 1e-6 x max|grad|. bf16 compute: the
logits are the same bf16 x bf16 -> fp32 products, but d(hidden) is rounded to bf16 once after an
fp32 sum over chunks (plain: once after one matmul) and d(head) is kept in fp32 (plain: rounded
to bf16), so gradients agree to 1 bf16 ulp: max|diff| <= 1e-2 x max|grad|; the loss to rtol 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.loss import chunked_token_nll, loss_sums_from_hidden, token_nll
from slayer_jax.modeling.model import forward, init_params

B, T, D, V = 2, 7, 16, 96


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(k[0], (B, T, D), jnp.float32).astype(dtype)
    w = 0.5 * jax.random.normal(k[1], (D, V), jnp.float32)  # fp32 "master" weights
    y = jax.random.randint(k[2], (B, T), 0, V)
    y = y.at[0, 0].set(0).at[0, 1].set(V - 1)  # both ends of the vocabulary
    wt = jax.random.uniform(k[3], (B, T)).at[1, 2].set(0.0)
    return h, w, y, wt


def _loss_and_grads(h, head, y, wt, chunk, transpose_head, dtype):
    def f(h, head):
        nll = chunked_token_nll(h, head, y, chunk=chunk, dtype=dtype, transpose_head=transpose_head)
        return jnp.sum(nll * wt)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, head)


def _close(a, b, rtol, atol_frac):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * float(np.abs(b).max()))


@pytest.mark.parametrize("transpose_head", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [1, 7, 32, 40, 95])  # 32 divides 96; the rest leave a tail chunk
def test_chunked_equals_plain_fp32(chunk, transpose_head):
    h, w, y, wt = _inputs()
    head = w.T if transpose_head else w
    v0, (gh0, gw0) = _loss_and_grads(h, head, y, wt, None, transpose_head, jnp.float32)
    v1, (gh1, gw1) = _loss_and_grads(h, head, y, wt, chunk, transpose_head, jnp.float32)
    assert gw1.shape == head.shape and gw1.dtype == head.dtype and gh1.dtype == h.dtype
    np.testing.assert_allclose(float(v1), float(v0), rtol=2e-6)
    _close(gh1, gh0, 1e-5, 1e-6)
    _close(gw1, gw0, 1e-5, 1e-6)


def test_per_token_nll_matches_and_plain_path_is_token_nll():
    h, w, y, _ = _inputs(1)
    logits = jnp.einsum("btd,dv->btv", h, w)
    ref = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(chunked_token_nll(h, w, y, chunk=None)), np.asarray(token_nll(logits, y)))
    np.testing.assert_array_equal(np.asarray(chunked_token_nll(h, w, y, chunk=V)),
                                  np.asarray(chunked_token_nll(h, w, y, chunk=None)))  # chunk >= V is plain
    np.testing.assert_allclose(np.asarray(chunked_token_nll(h, w, y, chunk=40)), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transpose_head", [False, True], ids=["untied", "tied"])
def test_chunked_equals_plain_bf16(transpose_head):
    h, w, y, wt = _inputs(2, jnp.bfloat16)
    head = w.T if transpose_head else w
    v0, (gh0, gw0) = _loss_and_grads(h, head, y, wt, None, transpose_head, jnp.bfloat16)
    v1, (gh1, gw1) = _loss_and_grads(h, head, y, wt, 40, transpose_head, jnp.bfloat16)
    assert gh1.dtype == jnp.bfloat16 and gw1.dtype == jnp.float32
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    _close(gh1, gh0, 0, 1e-2)
    _close(gw1, gw0, 0, 1e-2)


def test_argument_checks():
    h, w, y, _ = _inputs()
    with pytest.raises(ValueError, match="width"):
        chunked_token_nll(h, w, y, chunk=8, transpose_head=True)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_nll(h, w, y[:, :3], chunk=8)
    with pytest.raises(ValueError, match="positive"):
        chunked_token_nll(h, w, y, chunk=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_sums_from_hidden_equals_forward_logits(tied):
    """forward(return_hidden=True)'s last hidden (before the final norm) + loss_sums_from_hidden
    equals today's forward logits + token NLL, loss and gradients w.r.t. every parameter."""
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4, tie_word_embeddings=tied)
    params = init_params(cfg, 2, jax.random.PRNGKey(3), std=0.2)
    params["norm"]["scale"] = 1.0 + 0.1 * jax.random.normal(jax.random.PRNGKey(4), (D,))
    _, _, y, wt = _inputs(5)
    x = jax.random.randint(jax.random.PRNGKey(6), (B, T), 0, V)

    def plain(p):
        logits = forward(p, x, cfg)
        return jnp.sum(token_nll(logits, y) * wt)

    def chunked(p):
        _, hidden = forward(p, x, cfg, return_hidden=True)
        s, _ = loss_sums_from_hidden(hidden[-1], p, cfg, y, wt, jnp.float32, chunk=40)
        return s

    v0, g0 = jax.jit(jax.value_and_grad(plain))(params)
    v1, g1 = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(float(v1), float(v0), rtol=2e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g0)):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
    _, ws = loss_sums_from_hidden(forward(params, x, cfg, return_hidden=True)[1][-1], params, cfg, y, wt,
                                  jnp.float32)
    np.testing.assert_allclose(float(ws), float(jnp.sum(wt)), rtol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (deviceless TPU compile)")
def test_tpu_compiler_temporaries_llama3():
    """Llama-3 head (V=128256, D=4096), T=4096, 1 row per chip, v5p:2x2x1 fsdp=4, bf16 compute:
    loss+grad temporaries per chip, compiler's estimate. Measured (libtpu 0.0.52): plain 5.14 GiB,
    chunk=4096 0.50 GiB, of which 0.25 GiB is the bf16 copy of this chip's head shard (bench/loss_memory.py)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless: another process may hold the lock
    spec = importlib.util.spec_from_file_location(
        "loss_memory", Path(__file__).resolve().parents[1] / "bench" / "loss_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mesh = bench.v5p8_mesh()
    plain = bench.measure(mesh, 128256, 1, None, flops=False)["temp"]
    chunked = bench.measure(mesh, 128256, 1, 4096, flops=False)["temp"]
    gib = 2**30
    assert plain > 4 * gib  # [4096, 128256] fp32 logits alone are 1.96 GiB, plus their gradient
    assert chunked < 0.75 * gib and chunked * 5 < plain, (plain / gib, chunked / gib)
