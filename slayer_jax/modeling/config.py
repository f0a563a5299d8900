"""Model config: a frozen dataclass read from and written to HF ``config.json``.

The layer count is deliberately *not* a field: it is always ``len(params["layers"])``.
``num_hidden_layers`` is only read (to know how many tensors to expect on import) and
written (from the list length on export).

Anything whose maths this package does not implement is refused with a
:class:`ConfigError` naming the field, instead of silently computing wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from slayer_jax.errors import SlayerError, first_line

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(SlayerError, ValueError):
    """A config field that is missing, malformed, or whose maths is not implemented."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a sorted tuple of (key, value) pairs so the dataclass stays hashable (jit static arg).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float32, with rope_scaling applied."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv_freq = inv_freq.astype(np.float32)
        rs = self.rope_scaling_dict
        if rs is None:
            return inv_freq
        kind = rs["rope_type"]
        if kind == "default":
            return inv_freq
        if kind == "linear":
            return (inv_freq / np.float32(rs["factor"])).astype(np.float32)
        if kind == "llama3":
            factor = float(rs["factor"])
            low = float(rs["low_freq_factor"])
            high = float(rs["high_freq_factor"])
            old_ctx = float(rs["original_max_position_embeddings"])
            low_wavelen = old_ctx / low
            high_wavelen = old_ctx / high
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise ConfigError(f"rope_scaling.rope_type: {kind!r} is not implemented")  # unreachable after validate

    def param_count(self, num_layers: int) -> int:
        d, f, h, k, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                          self.num_key_value_heads, self.head_dim)
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * k * hd + d
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + num_layers * layer + d + head

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse an HF config dict. ``source`` names the file in error messages."""

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: field '{key}' is missing (required for a {d.get('model_type')} model)")
            return d[key]

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"{source}: field '{key}' is {show_value(d[key])}; expected {expected}")

        def as_int(key: str, default: Any = None) -> int:
            v = need(key) if default is None else (d[key] if d.get(key) is not None else default)
            if not _is_number(v) or v != int(v):
                raise bad(key, "an integer")
            return int(v)

        def as_float(key: str, default: float) -> float:
            v = d.get(key)
            if v is None:
                return default
            if not _is_number(v):
                raise bad(key, "a finite number")
            return float(v)

        def as_bool(key: str, default: bool) -> bool:
            v = d.get(key)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise bad(key, "true or false")
            return v

        def token_id(key: str, many: bool = False) -> Any:
            v = d.get(key)
            if v is None:
                return None
            if many and isinstance(v, list):
                if not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
                    raise bad(key, "a token id or a list of token ids (integers)")
                return tuple(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, "a token id (an integer)" + (" or a list of them" if many else ""))
            return v

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {show_value(model_type)}; expected one of "
                f"{list(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {show_value(act)}; only 'silu' (SwiGLU) is implemented")
        for key in ("attention_dropout", "mlp_dropout"):
            if as_float(key, 0.0) != 0.0:
                raise ConfigError(f"{source}: field '{key}' is {show_value(d[key])}; dropout is not implemented, "
                                  f"expected 0.0")

        hidden = as_int("hidden_size")
        heads = as_int("num_attention_heads")
        if heads <= 0:
            raise bad("num_attention_heads", "a positive integer")
        kv_heads = as_int("num_key_value_heads", heads) or heads
        head_dim = as_int("head_dim", 0) or hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({kv_heads}) must divide "
                              f"num_attention_heads ({heads})")

        # transformers >= 5 nests theta and scaling under 'rope_parameters'.
        rope_params = d.get("rope_parameters")
        rope_theta = as_float("rope_theta", 10000.0)
        rope_scaling = d.get("rope_scaling")
        if isinstance(rope_params, dict):
            theta = rope_params.get("rope_theta", rope_theta)
            if not _is_number(theta):
                raise ConfigError(f"{source}: field 'rope_parameters.rope_theta' is {show_value(theta)}; "
                                  f"expected a finite number")
            rope_theta = float(theta)
            if rope_scaling is None:
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        elif rope_params is not None:
            raise bad("rope_parameters", "an object")
        rope_scaling = _normalise_rope_scaling(rope_scaling, source)

        sliding = d.get("sliding_window")
        if model_type == "llama" and sliding is not None:
            raise ConfigError(f"{source}: field 'sliding_window' is {show_value(sliding)}; llama has no sliding window")
        if model_type == "mistral" and d.get("use_sliding_window") is False:
            sliding = None
        if sliding is not None:
            sliding = as_int("sliding_window")
        cfg = cls(
            vocab_size=as_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=as_int("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=model_type,
            rms_norm_eps=as_float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=as_int("max_position_embeddings", 2048),
            tie_word_embeddings=as_bool("tie_word_embeddings", False),
            attention_bias=as_bool("attention_bias", False),
            mlp_bias=as_bool("mlp_bias", False),
            sliding_window=sliding,
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id", many=True),
            pad_token_id=token_id("pad_token_id"),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{source}: field 'sliding_window' must be positive, got {self.sliding_window}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):  # else frequencies are inf or NaN
            raise ConfigError(f"{source}: field 'rope_theta' must be a finite positive number, got {self.rope_theta!r}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ConfigError(f"{source}: field 'rms_norm_eps' must be a finite number >= 0, got "
                              f"{self.rms_norm_eps!r}")

    def to_hf_dict(self, num_hidden_layers: int) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": int(num_hidden_layers),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
            d["pretraining_tp"] = 1
        else:
            if self.mlp_bias:
                raise ConfigError("mlp_bias: transformers' Mistral has no MLP bias; cannot export it as mistral")
            d["sliding_window"] = self.sliding_window
        return d

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def show_value(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters: a value from a file, quoted on one line of an error."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_number(v: Any) -> bool:
    """A JSON number that is finite (json reads NaN, Infinity and 1e400 as floats); not true/false."""
    return not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and math.isfinite(v))


ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _normalise_rope_scaling(rs: Any, source: str) -> tuple[tuple[str, Any], ...] | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {type(rs).__name__}")
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type"))
    if kind is None:
        raise ConfigError(f"{source}: field 'rope_scaling.rope_type' is missing; expected one of "
                          f"{list(SUPPORTED_ROPE_TYPES)}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: field 'rope_scaling.rope_type' is {show_value(kind)}; expected one of "
                          f"{list(SUPPORTED_ROPE_TYPES)} (its maths is not implemented)")
    for key, v in rs.items():  # the values go into a hashable, jit-static config: numbers and names only
        name = json.dumps(key)[1:-1]  # one line, whatever the key holds
        if key in ROPE_POSITIVE and v is not None and not (_is_number(v) and v > 0):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' is {show_value(v)}; expected a positive number")
        if key == "attention_factor" and v is not None and not _is_number(v):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' is {show_value(v)}; expected a finite number")
        if isinstance(v, (list, dict)):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' is {show_value(v)}; expected a number, a string, "
                              f"true/false or null")
    rs.pop("type", None)
    rs["rope_type"] = kind
    required = {"default": [], "linear": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    for key in required[kind]:
        if rs.get(key) is None:
            raise ConfigError(f"{source}: field 'rope_scaling.{key}' is missing (required by rope_type {kind!r})")
    if kind == "llama3" and float(rs["high_freq_factor"]) == float(rs["low_freq_factor"]):
        raise ConfigError(f"{source}: field 'rope_scaling.high_freq_factor' must differ from low_freq_factor")
    attn_factor = rs.get("attention_factor")
    if attn_factor is not None and float(attn_factor) != 1.0:
        raise ConfigError(f"{source}: field 'rope_scaling.attention_factor' is {show_value(attn_factor)}; only 1.0 is "
                          f"implemented")
    if kind == "default":
        return None
    return tuple(sorted(rs.items()))


def load_config(path: str | Path) -> tuple[ModelConfig, int]:
    """Read ``config.json`` (or the directory holding it). Returns (config, num_hidden_layers)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: file not found; expected an HF config.json")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected an HF config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; arrays nested too deeply
        raise ConfigError(f"{path}: not valid JSON ({first_line(e)[:100]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    cfg = ModelConfig.from_hf_dict(d, source=str(path))
    n = d.get("num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{path}: field 'num_hidden_layers' must be a non-negative integer, got {show_value(n)}")
    return cfg, n
