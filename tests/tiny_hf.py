"""Tiny random-weight reference models built with transformers' PyTorch classes (test only)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama2": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0),
    "llama31_rope_llama3_untied": dict(
        model_type="llama", tie_word_embeddings=False, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "mistral_sliding_window": dict(model_type="mistral", tie_word_embeddings=False, num_key_value_heads=2,
                                   sliding_window=7, rope_theta=1e6),
    "tied_embeddings": dict(model_type="llama", tie_word_embeddings=True),
    "gqa_kv1": dict(model_type="llama", num_key_value_heads=1),
    "gqa_kv2": dict(model_type="llama", num_key_value_heads=2),
    "gqa_kv4": dict(model_type="llama", num_key_value_heads=4),
    "explicit_head_dim": dict(model_type="llama", head_dim=24, num_key_value_heads=2),
    "rope_linear_biases": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 4.0},
                               attention_bias=True, mlp_bias=True),
}


def make_hf_model(variant: str, seed: int = 0):
    """A transformers causal LM with random weights (norm weights and biases randomised too)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kw = {**BASE, **VARIANTS[variant]}
    model_type = kw.pop("model_type")
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if model_type == "llama" else (MistralConfig,
                                                                                      MistralForCausalLM)
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
