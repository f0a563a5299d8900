"""Import llama.cpp GGUF files (llama architecture) into the canonical params pytree.

Every tensor is dequantised with ``gguf.quants.dequantize`` (numpy) and turned into a device
array as soon as it is read, so host memory holds one fp32 tensor at a time on top of the
memory-mapped file. llama.cpp's converter changes two things that are undone here:

* q/k projection rows are permuted per head (``LlamaModel.permute`` in llama.cpp's
  ``convert_hf_to_gguf.py``: each head's rotary halves are interleaved); k uses the kv-head count;
* the tokenizer lives in metadata (``tokenizer.ggml.*``), not in ``tokenizer.json``.

The tokenizer is rebuilt with ``tokenizers`` only (transformers' own GGUF path imports torch),
mirroring transformers' ``integrations/gguf/gguf_tokenizer_mapping.py`` for byte-level BPE
("gpt2") vocabularies so that both produce the same ids.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import ConfigError, ModelConfig, show_value
from slayer_jax.modeling.model import Params, as_dtype, expected_shapes

SUPPORTED_ARCHITECTURES = ("llama",)
# GGUF tensor suffix under blk.N. -> (our module, our leaf, transposed).
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "scale", False),
    "attn_q.weight": ("q_proj", "kernel", True),
    "attn_k.weight": ("k_proj", "kernel", True),
    "attn_v.weight": ("v_proj", "kernel", True),
    "attn_output.weight": ("o_proj", "kernel", True),
    "attn_q.bias": ("q_proj", "bias", False),
    "attn_k.bias": ("k_proj", "bias", False),
    "attn_v.bias": ("v_proj", "bias", False),
    "attn_output.bias": ("o_proj", "bias", False),
    "ffn_norm.weight": ("mlp_norm", "scale", False),
    "ffn_gate.weight": ("gate_proj", "kernel", True),
    "ffn_up.weight": ("up_proj", "kernel", True),
    "ffn_down.weight": ("down_proj", "kernel", True),
    "ffn_gate.bias": ("gate_proj", "bias", False),
    "ffn_up.bias": ("up_proj", "bias", False),
    "ffn_down.bias": ("down_proj", "bias", False),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": (("embed", "embedding"), False),
    "output_norm.weight": (("norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"
LLAMA3_ORIGINAL_CONTEXT = 8192  # llama.cpp's default; only the ratios to the factors matter

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

# Split regexes transformers applies before ByteLevel for these `tokenizer.ggml.pre` values
# (gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS); any other value gets GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


# ----------------------------------------------------------------------------- reading
def _open_reader(path: Path):
    """A ``GGUFReader`` over ``path``; every way the file can be unreadable is a one-line SlayerError."""
    from gguf import GGUFReader

    if not path.exists():
        raise SlayerError(f"{path}: file not found; expected a GGUF file")
    if not path.is_file():
        raise SlayerError(f"{path}: not a file; expected a GGUF file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SlayerError(f"{path}: cannot be read ({e.strerror})") from None
    if magic != b"GGUF":
        raise SlayerError(f"{path}: not a GGUF file (magic bytes {magic!r}; expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # short reads surface as ValueError/IndexError from numpy views of the mmap
        raise SlayerError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes; "
                          f"gguf reader: {_one_line(e)})") from None
    size = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise SlayerError(f"{path}: truncated; tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                              f"but the file has {size} bytes")
    return reader


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[:200]


def read_metadata(reader, source: str = "gguf") -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except UnicodeDecodeError as e:
            raise SlayerError(f"{source}: field {name!r} holds a string that is not UTF-8 (byte {e.start}); "
                              f"expected UTF-8 text") from None
        except (ValueError, IndexError) as e:
            raise SlayerError(f"{source}: field {name!r} cannot be read ({_one_line(e)})") from None
    return meta


# What each kind of metadata value must be (GGUF has 13 value types; the writer picks any of them).
_KINDS = {
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: _is_int(v) and v > 0, "one positive integer"),
    "id": (lambda v: _is_int(v) and v >= 0, "a token id (an integer >= 0)"),
    "number": (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v),
               "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
}
_REQUIRED = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def metadata_value(meta: dict[str, Any], key: str, kind: str, source: str, default: Any = None,
                   required: str | None = None) -> Any:
    """``meta[key]`` checked to be of ``kind`` (see ``_KINDS``); ``default`` when absent, or a
    one-line error when ``required`` (what needs it) is given."""
    if key not in meta:
        if required is not None:
            raise SlayerError(f"{source}: field '{key}' is missing (required for {required})")
        return default
    ok, expected = _KINDS[kind]
    v = meta[key]
    if not ok(v):
        raise SlayerError(f"{source}: field '{key}' is {show_value(v)}; expected {expected}")
    return v


def _clean_float(x: float) -> float:
    """GGUF stores float32; report the shortest decimal that rounds to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------- config
def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], source: str,
                     rope_freqs: np.ndarray | None = None) -> tuple[ModelConfig, int]:
    """(ModelConfig, block_count) from GGUF metadata. ``tensor_shapes`` are numpy-order shapes."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SlayerError(f"{source}: field 'general.architecture' is {show_value(arch)}; expected 'llama'")

    def need(key: str, kind: str) -> Any:
        return metadata_value(meta, f"{arch}.{key}", kind, source, required="a llama model")

    def opt(key: str, kind: str, default: Any) -> Any:
        return metadata_value(meta, f"{arch}.{key}", kind, source, default)

    n_layers = need("block_count", "count")
    hidden = need("embedding_length", "positive")
    heads = need("attention.head_count", "positive")
    kv_heads = opt("attention.head_count_kv", "positive", heads)
    if heads % kv_heads:
        raise SlayerError(f"{source}: field '{arch}.attention.head_count_kv' ({kv_heads}) must divide "
                          f"attention.head_count ({heads})")
    head_dim = opt("attention.key_length", "positive", hidden // heads)
    value_dim = opt("attention.value_length", "positive", head_dim)
    if value_dim != head_dim:
        raise SlayerError(f"{source}: field '{arch}.attention.value_length' is {value_dim}; expected "
                          f"{head_dim} (equal to attention.key_length)")
    rope_dim = opt("rope.dimension_count", "count", head_dim)
    if rope_dim != head_dim:
        raise SlayerError(f"{source}: field '{arch}.rope.dimension_count' is {rope_dim}; expected {head_dim} "
                          f"(partial rotary embeddings are not implemented)")

    tokens = metadata_value(meta, "tokenizer.ggml.tokens", "strings", source)
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None:
        raise SlayerError(f"{source}: tensor 'token_embd.weight' is missing; expected a llama token embedding")
    vocab = len(tokens) if tokens is not None else opt("vocab_size", "positive", embd[0])
    if embd[0] != vocab:
        raise SlayerError(f"{source}: tensor 'token_embd.weight' has {embd[0]} rows; expected {vocab} "
                          f"(the length of tokenizer.ggml.tokens)")
    theta = float(opt("rope.freq_base", "number", 10000.0))
    rope_scaling = _rope_scaling(meta, arch, source, rope_freqs, theta, head_dim)

    has = lambda suffix: f"blk.0.{suffix}" in tensor_shapes  # noqa: E731
    attn_bias = [has(f"{m}.bias") for m in ("attn_q", "attn_k", "attn_v", "attn_output")]
    mlp_bias = [has(f"{m}.bias") for m in ("ffn_gate", "ffn_up", "ffn_down")]
    for flags, what in ((attn_bias, "attn_q/attn_k/attn_v/attn_output"), (mlp_bias, "ffn_gate/ffn_up/ffn_down")):
        if any(flags) and not all(flags):
            raise SlayerError(f"{source}: tensors 'blk.0.{{{what}}}.bias' are only partly present; "
                              f"expected all of them or none")
    def token_id(key: str) -> int | None:
        value = metadata_value(meta, f"tokenizer.ggml.{key}", "id", source)
        return None if value is None else int(value)

    cfg = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(need("feed_forward_length", "positive")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        model_type="llama",
        rms_norm_eps=_clean_float(need("attention.layer_norm_rms_epsilon", "number")),
        rope_theta=_clean_float(theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(opt("context_length", "positive", 2048)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=all(attn_bias),
        mlp_bias=all(mlp_bias),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
    )
    try:
        cfg.validate(source)
    except ConfigError as e:
        raise SlayerError(str(e)) from None
    return cfg, int(n_layers)


def _rope_scaling(meta: dict[str, Any], arch: str, source: str, rope_freqs: np.ndarray | None,
                  theta: float, head_dim: int) -> tuple[tuple[str, Any], ...] | None:
    kind = metadata_value(meta, f"{arch}.rope.scaling.type", "str", source, "none")
    if rope_freqs is not None:
        if kind not in ("none", None):
            raise SlayerError(f"{source}: field '{arch}.rope.scaling.type' is {kind!r} and tensor "
                              f"'{ROPE_FREQS_TENSOR}' is present; expected only one of them")
        return _llama3_from_rope_freqs(rope_freqs, theta, head_dim, source)
    if kind in ("none", None):
        return None
    if kind == "linear":
        factor = metadata_value(meta, f"{arch}.rope.scaling.factor", "number", source,
                                required="linear rope scaling")
        if not factor > 0:
            raise SlayerError(f"{source}: field '{arch}.rope.scaling.factor' is {factor}; expected a positive number")
        return tuple(sorted({"rope_type": "linear", "factor": _clean_float(factor)}.items()))
    raise SlayerError(f"{source}: field '{arch}.rope.scaling.type' is {show_value(kind)}; expected 'none' or 'linear' "
                      f"(its maths is not implemented)")


def _llama3_from_rope_freqs(factors: np.ndarray, theta: float, head_dim: int,
                            source: str) -> tuple[tuple[str, Any], ...] | None:
    """Recover llama3 rope_scaling from llama.cpp's precomputed per-frequency divisors.

    llama.cpp writes Llama-3.1-style scaling as a tensor of divisors f_i (1 at high frequency,
    ``factor`` at low frequency, smooth in between: 1/f = (1-s)/factor + s with s linear in
    1/wavelength). s, and therefore the maths, depends only on original_context/low_freq_factor
    and original_context/high_freq_factor, so original_context is fixed at 8192 and the two
    factors are fitted, then the result is checked against every divisor.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    fail = f"{source}: tensor '{ROPE_FREQS_TENSOR}' is not a llama3 rope scaling this loader can represent"
    if f.shape[0] != head_dim // 2:
        raise SlayerError(f"{fail} (it has {f.shape[0]} entries; expected {head_dim // 2})")
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    medium = (f > 1 + 1e-5) & (f < factor - 1e-5 * factor)
    if medium.sum() < 2:
        raise SlayerError(f"{fail} (needs at least two smoothly scaled frequencies; found {int(medium.sum())})")
    smooth = (1.0 / f[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)  # s_i = old/(high-low)/w_i - low/(high-low)
    slope, intercept = np.polyfit(1.0 / wavelen[medium], smooth, 1)
    if not slope > 0:
        raise SlayerError(f"{fail} (its smooth region does not rise with frequency)")
    span = LLAMA3_ORIGINAL_CONTEXT / slope  # high_freq_factor - low_freq_factor
    low = -intercept * span
    nice = lambda x: float(f"{x:.6g}")  # noqa: E731  (1.0000001 -> 1.0; checked below either way)
    rs = tuple(sorted({"rope_type": "llama3", "factor": nice(factor), "low_freq_factor": nice(low),
                       "high_freq_factor": nice(low + span),
                       "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}.items()))
    probe = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_attention_heads=1,
                        num_key_value_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=rs)
    got = probe.rope_inv_freq().astype(np.float64)
    want = inv_freq / f
    if not (np.isfinite(got).all() and np.allclose(got, want, rtol=1e-4, atol=0)):
        raise SlayerError(f"{fail} (a fitted llama3 scaling misses it by {np.max(np.abs(got / want - 1)):.2g})")
    return rs


# ----------------------------------------------------------------------------- weights
def unpermute_qk(w_out_in: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` on q/k rows ([out, ...], HF layout).

    llama.cpp: ``w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2)``; this is its inverse.
    """
    out = w_out_in.shape[0]
    half = out // n_head // 2
    return w_out_in.reshape(n_head, half, 2, *w_out_in.shape[1:]).swapaxes(1, 2).reshape(w_out_in.shape)


def _tensor_target(name: str, n_layers: int, source: str) -> tuple[tuple, bool]:
    """(path in our tree, transposed) for a GGUF tensor name."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        i = int(parts[1])
        if i >= n_layers:
            raise SlayerError(f"{source}: tensor {name!r} is for block {i}; field 'llama.block_count' says "
                              f"{n_layers} blocks")
        key, leaf, transposed = _LAYER_TENSORS[parts[2]]
        return ("layers", i, key, leaf), transposed
    raise SlayerError(f"{source}: tensor {name!r} is not one a llama model has; expected token_embd, "
                      f"output_norm, output or blk.N.{{attn_*,ffn_*}}")


def load_gguf(path: str | Path, dtype: Any = None, *, tokenizer: bool = True, mesh: Any = None,
              shardings: Any = None, progress: bool = True) -> tuple[Params, ModelConfig, Any]:
    """Import a llama GGUF file. Returns (params, cfg, tokenizer_or_None).

    dtype: dtype of the returned arrays (default float32; every tensor is dequantised to fp32 first).
    tokenizer: also build the ``PreTrainedTokenizerFast`` from the file's metadata.
    mesh: place every leaf as a global ``jax.Array`` with its role sharding
        (:func:`slayer_jax.parallel.sharding.param_shardings`); each tensor is still dequantised whole on
        the host (GGUF models here are small), but only the local shards go to devices.
    shardings: instead of ``mesh``'s role rules, a tree of shardings shaped like the params.
    """
    from gguf.quants import dequantize

    path = Path(path)
    source = str(path)
    reader = _open_reader(path)
    meta = read_metadata(reader, source)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if ROPE_FREQS_TENSOR in by_name:
        t = by_name[ROPE_FREQS_TENSOR]
        rope_freqs = np.array(dequantize(t.data, t.tensor_type), np.float32)
    cfg, n_layers = config_from_gguf(meta, shapes, source, rope_freqs)
    if n_layers > len(shapes):  # before anything is built per layer: a huge count must not exhaust memory
        raise SlayerError(f"{source}: field 'llama.block_count' is {n_layers}; the file holds {len(shapes)} "
                          f"tensors, too few for that many blocks")
    out_dtype = jnp.float32 if dtype is None else as_dtype(dtype)

    want = expected_shapes(cfg, n_layers)
    if shardings is None and mesh is not None:
        from slayer_jax.parallel.sharding import param_shardings

        shardings = param_shardings(want, mesh)
    params: Params = {"embed": {}, "layers": [{} for _ in range(n_layers)], "norm": {}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {}
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS_TENSOR]
    for t in tqdm(tensors, desc=f"import {path.name}", unit="tensor", disable=None if progress else True,
                  file=sys.stderr):
        tree_path, transposed = _tensor_target(t.name, n_layers, source)
        expect = _leaf(want, tree_path)
        got = shapes[t.name][::-1] if transposed else shapes[t.name]
        if expect is None or tuple(got) != tuple(expect.shape):
            implied = None if expect is None else list(expect.shape[::-1] if transposed else expect.shape)
            raise SlayerError(f"{source}: tensor {t.name!r} has shape {list(shapes[t.name])} ([out, in]); "
                              f"the metadata implies {implied}")
        node = _parent(params, tree_path)
        if tree_path[-1] in node:
            raise SlayerError(f"{source}: tensor {t.name!r} appears twice")
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shapes[t.name])
        if t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        if transposed:
            w = w.T
        # Copy what still views the memory-mapped file; otherwise only make it contiguous.
        w = np.array(w, order="C") if np.may_share_memory(w, reader.data) else np.ascontiguousarray(w)
        if shardings is None:
            node[tree_path[-1]] = jnp.asarray(w, dtype=out_dtype)
        else:
            node[tree_path[-1]] = jax.make_array_from_callback(
                w.shape, _leaf(shardings, tree_path), lambda index, w=w: np.asarray(w[index], dtype=out_dtype))
        del w
    _check_complete(params, want, source)
    tok = tokenizer_from_gguf(meta, source) if tokenizer else None
    return params, cfg, tok


def _leaf(tree: Any, path: tuple) -> Any:
    for k in path:
        try:
            tree = tree[k]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _parent(tree: dict, path: tuple) -> dict:
    for k in path[:-1]:
        if isinstance(tree, dict):
            tree = tree.setdefault(k, {})
        else:
            tree = tree[k]
    return tree


def _check_complete(params: Params, want: Params, source: str) -> None:
    """Every leaf the config implies was read; names the first missing GGUF tensor."""
    gguf_names = {path: name for name, (path, _) in _GLOBAL_TENSORS.items()}
    for p, _ in jax.tree_util.tree_leaves_with_path(want):
        path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in p)
        if _leaf(params, path) is None:
            if path[0] == "layers":
                suffix = next(s for s, (key, leaf, _) in _LAYER_TENSORS.items() if (key, leaf) == path[2:])
                name = f"blk.{path[1]}.{suffix}"
            else:
                name = gguf_names[path]
            raise SlayerError(f"{source}: tensor {name!r} is missing; the metadata implies it")


# ----------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(meta: dict[str, Any], source: str = "gguf"):
    """A ``transformers.PreTrainedTokenizerFast`` built from ``tokenizer.ggml.*`` metadata.

    Byte-level BPE only (``tokenizer.ggml.model == "gpt2"``), built the way transformers'
    GGUF loader builds it: GPT-2 byte-level pre-tokenizer (with a split regex for the
    ``tokenizer.ggml.pre`` values transformers knows) and decoder, tokens outside the byte
    alphabet respelled from their UTF-8 bytes, control tokens (type 3) added as special tokens,
    user-defined tokens (type 4) as plain added tokens, BOS/EOS added only when
    ``tokenizer.ggml.add_bos_token``/``add_eos_token`` say so.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    def value(key: str, kind: str, default: Any = None, required: str | None = None) -> Any:
        return metadata_value(meta, f"tokenizer.ggml.{key}", kind, source, default, required)

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise SlayerError(f"{source}: field 'tokenizer.ggml.model' is {show_value(model)}; expected 'gpt2' "
                          f"(byte-level BPE; other tokenizer types are not implemented)")
    tokens = value("tokens", "strings", required="a byte-level BPE tokenizer")
    merges = value("merges", "strings", required="a byte-level BPE tokenizer")
    types = value("token_type", "ints") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise SlayerError(f"{source}: field 'tokenizer.ggml.token_type' has {len(types)} entries; expected "
                          f"{len(tokens)} (one per token)")

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        pair = m.split(" ")
        if len(pair) != 2:
            raise SlayerError(f"{source}: field 'tokenizer.ggml.merges' has entry {show_value(m)}; expected two "
                              f"space-separated pieces")
        pairs.append(tuple(pair))
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    except Exception as e:  # noqa: BLE001 - the tokenizers library's one error type (e.g. a merge of unknown tokens)
        raise SlayerError(f"{source}: fields 'tokenizer.ggml.tokens' and 'tokenizer.ggml.merges' do not make a BPE "
                          f"tokenizer ({_one_line(e)}); expected merges of tokens in the vocabulary") from None
    split = PRE_TOKENIZER_SPLITS.get(value("pre", "str"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def special_id(key: str) -> int | None:
        i = value(key, "id")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise SlayerError(f"{source}: field 'tokenizer.ggml.{key}' is {i}; expected a token id below "
                              f"{len(tokens)}")
        return None if i is None else int(i)

    bos_id, eos_id, unk_id, pad_id = (special_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                              "padding_token_id"))
    bos, eos, unk, pad = (None if i is None else tokens[i] for i in (bos_id, eos_id, unk_id, pad_id))
    add_bos = value("add_bos_token", "bool", False) and bos is not None
    add_eos = value("add_eos_token", "bool", False) and eos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    ids = [(t, i) for t, i, on in ((bos, bos_id, add_bos), (eos, eos_id, add_eos)) if on]
    try:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    except Exception as e:  # noqa: BLE001 - e.g. a BOS token spelled with a space or a colon
        raise SlayerError(f"{source}: fields 'tokenizer.ggml.bos_token_id' / 'eos_token_id' name tokens "
                          f"{show_value(bos)} / {show_value(eos)} that cannot be added around a text ({_one_line(e)}); "
                          f"expected tokens without spaces") from None

    kwargs: dict[str, Any] = dict(bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                  add_bos_token=add_bos, add_eos_token=add_eos)
    template = metadata_value(meta, "tokenizer.chat_template", "str", source)
    if template is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None})
