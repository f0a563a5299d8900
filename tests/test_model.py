"""The decoder beyond plain parity: packed segments, remat, bf16 compute, any list length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import hf_logits, make_hf_model

from slayer_jax.io.hf import load_hf
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import count_params, forward, init_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model("llama31_rope_llama3_untied")
    d = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(d)
    params, cfg, _ = load_hf(d, progress=False)
    return hf, params, cfg


def test_packed_documents_never_attend_to_each_other(tiny):
    """Three documents packed in one row give each document's stand-alone logits (HF reference)."""
    hf, params, cfg = tiny
    rng = np.random.RandomState(1)
    docs = [rng.randint(0, 97, n) for n in (9, 14, 5)]
    tokens = np.concatenate(docs)[None]
    segs = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs])[None]
    packed = np.asarray(forward(params, jnp.asarray(tokens), cfg, jnp.asarray(pos), jnp.asarray(segs)))
    start = 0
    for d in docs:
        alone = hf_logits(hf, d[None])[0]
        np.testing.assert_allclose(packed[0, start:start + len(d)], alone, atol=1e-4, rtol=0)
        start += len(d)
    # the same row without segment ids mixes documents: the test above is not vacuous
    mixed = np.asarray(forward(params, jnp.asarray(tokens), cfg, jnp.asarray(pos)))
    assert np.abs(mixed[0, 9:] - packed[0, 9:]).max() > 1e-2


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_same_loss_and_grads(tiny, remat):
    _, params, cfg = tiny
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 16)))

    def loss(p, remat_policy):
        logits = forward(p, tokens, cfg, remat=remat_policy)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    l0, g0 = jax.value_and_grad(loss)(params, None)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g0, g1)


def test_bf16_compute_tracks_fp32(tiny):
    """bf16 compute over fp32 master weights: close to fp32 at bf16 precision (8 mantissa bits)."""
    _, params, cfg = tiny
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 97, (2, 20)))
    f32 = np.asarray(forward(params, tokens, cfg))
    b16 = np.asarray(forward(params, tokens, cfg, dtype="bf16"))
    assert b16.dtype == np.float32  # logits come back in fp32
    scale = np.abs(f32).max()
    assert np.abs(b16 - f32).max() < 0.05 * scale  # a few bf16 ulps accumulated over 3 blocks
    assert (b16.argmax(-1) == f32.argmax(-1)).mean() > 0.9
    # bf16-stored params work too
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert np.isfinite(np.asarray(forward(p16, tokens, cfg, dtype="bf16"))).all()


@pytest.mark.parametrize("n_layers", [0, 1, 5])
def test_any_list_length(n_layers):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    params = init_params(cfg, n_layers, jax.random.PRNGKey(0))
    assert len(params["layers"]) == n_layers
    assert count_params(params) == cfg.param_count(n_layers)
    logits, hidden = forward(params, jnp.zeros((1, 6), jnp.int32), cfg, return_hidden=True)
    assert logits.shape == (1, 6, 50) and len(hidden) == n_layers + 1
