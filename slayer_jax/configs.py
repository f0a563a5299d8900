"""ml_collections recipe files (``configs/*.py`` with ``get_config()``) and ``--config.x=y`` overrides."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

from slayer_jax.errors import SlayerError


def load_config_file(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.exists():
        raise SlayerError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"slayer_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise SlayerError(f"{path}: no get_config() function; expected an ml_collections config file")
    cfg = mod.get_config()
    for ov in overrides:
        apply_override(cfg, ov, str(path))
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, override: str, source: str = "config") -> None:
    """Apply 'a.b=value' (value parsed as a Python literal when it is one, else a string).
    An unknown key or a type change is a one-line error."""
    key, sep, raw = override.removeprefix("--config.").removeprefix("config.").partition("=")
    if not sep:
        raise SlayerError(f"{source}: override '{override}' is not KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise SlayerError(f"{source}: unknown config key '{key}'")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise SlayerError(f"{source}: unknown config key '{key}'")
    old = node[parts[-1]]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise SlayerError(f"{source}: config key '{key}' is a bool; got {raw!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, str):
        raise SlayerError(f"{source}: config key '{key}' expects a number; got {raw!r}")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = raw
    if isinstance(old, tuple) and isinstance(value, (int, list)):
        value = tuple(value) if isinstance(value, list) else (value,)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise SlayerError(f"{source}: config key '{key}': {e}") from None
