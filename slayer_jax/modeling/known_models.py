"""HF configs of the paper-scale models, for planning without weights (``slayer plan``).

Values are the ``config.json`` fields of the public checkpoints named in each key's comment.
"""

from __future__ import annotations

from slayer_jax.modeling.config import ModelConfig

_LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)

KNOWN: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf
    "llama2_7b": _LLAMA2_7B,
    # meta-llama/Meta-Llama-3-8B
    "llama3_8b": dict(_LLAMA2_7B, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                      rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.1-8B
    "llama3.1_8b": dict(_LLAMA2_7B, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                        rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000,
                        eos_token_id=128001,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # mistralai/Mistral-7B-v0.1
    "mistral_7b": dict(_LLAMA2_7B, model_type="mistral", intermediate_size=14336, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
}


def known_config(name: str) -> tuple[ModelConfig, int]:
    if name not in KNOWN:
        from slayer_jax.errors import SlayerError

        raise SlayerError(f"model_config: {name!r} is not one of {sorted(KNOWN)}")
    d = KNOWN[name]
    return ModelConfig.from_hf_dict(d, source=f"known_models[{name}]"), d["num_hidden_layers"]
