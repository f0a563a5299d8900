"""Import -> logits == transformers; export -> transformers reload -> same logits (fp32, 1e-4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import VARIANTS, hf_logits, make_hf_model

from slayer_jax.io.hf import load_hf, save_hf
from slayer_jax.modeling.model import forward

TOL = 1e-4  # fp32 end to end; differences are only reduction order


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(0, 97, size=(2, 24))  # 24 > mistral's sliding window 7


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_export_logit_parity(variant, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(variant)
    hf.save_pretrained(tmp_path / "hf")
    params, cfg, _ = load_hf(tmp_path / "hf", progress=False)
    assert len(params["layers"]) == hf.config.num_hidden_layers
    assert ("lm_head" in params) == (not hf.config.tie_word_embeddings)
    ref = hf_logits(hf, tokens)
    ours = np.asarray(jax.jit(forward, static_argnums=2)(params, jnp.asarray(tokens), cfg))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < TOL, np.abs(ours - ref).max()

    out = save_hf(params, cfg, tmp_path / "export", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == len(params["layers"])
    assert np.abs(hf_logits(reloaded, tokens) - ours).max() < TOL
    # and our own importer reads our export back bit-exactly
    params2, cfg2, _ = load_hf(out, progress=False)
    assert cfg2 == cfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_sliding_window_matters(tokens, tmp_path):
    """Guard against a vacuous Mistral test: without the window the logits must differ."""
    hf = make_hf_model("mistral_sliding_window")
    hf.save_pretrained(tmp_path / "hf")
    params, cfg, _ = load_hf(tmp_path / "hf", progress=False)
    full = np.asarray(forward(params, jnp.asarray(tokens), cfg.replace(sliding_window=None)))
    assert np.abs(full - hf_logits(hf, tokens)).max() > 1e-3


def test_sharded_export_index(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path / "hf")
    params, cfg, _ = load_hf(tmp_path / "hf", progress=False)
    out = save_hf(params, cfg, tmp_path / "sharded", shard_bytes=60_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert not (out / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(hf, tokens)).max() < TOL
    params2, _, _ = load_hf(out, progress=False)  # our importer reads the sharded layout too
    assert np.array_equal(np.asarray(params2["layers"][2]["down_proj"]["kernel"]),
                          np.asarray(params["layers"][2]["down_proj"]["kernel"]))


def test_cli_checkpoint_round_trip_and_info(tokens, tmp_path, capsys):
    """convert HF -> slayer checkpoint -> export HF: the same logits in transformers; info counts."""
    from transformers import AutoModelForCausalLM

    from slayer_jax.cli import main

    hf = make_hf_model("tied_embeddings")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--to", "checkpoint"]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    sd, sd_back = hf.state_dict(), back.state_dict()
    for name, t in sd.items():  # fp32 all the way: every weight bit-identical
        assert (t == sd_back[name]).all(), name
    assert np.abs(hf_logits(back, tokens) - hf_logits(hf, tokens)).max() < TOL
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ckpt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 3 and info["total_params"] == sum(p.numel() for p in hf.parameters())
    assert "lm_head" not in info["components"]
