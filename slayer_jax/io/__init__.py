"""Model import/export: HF safetensors directories, GGUF files and slayer checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slayer_jax import storage
from slayer_jax.errors import SlayerError
from slayer_jax.io.checkpoint import is_model_checkpoint, load_model
from slayer_jax.io.hf import load_hf


def load_any(src: str | Path, dtype: Any = None, mesh: Any = None):
    """(params, cfg, tokenizer) from an HF directory, a .gguf file or a slayer checkpoint.

    The special name ``default`` is the default model (SmolLM2-135M-Instruct, cached).
    dtype: cast the weights to this dtype (default: the stored dtype; float32 for GGUF).
    mesh: a ``jax.sharding.Mesh``: every leaf is a global ``jax.Array`` placed with its role
        sharding (:func:`slayer_jax.parallel.sharding.param_shardings`), and each process reads only
        what its own devices need (HF safetensors: the stored rows of its shards; slayer
        checkpoints: its shards; a GGUF file is dequantised whole on each host). Every process of a multi-host job must call it."""
    src = str(src)
    if src == "default":
        from slayer_jax.io.assets import default_model_dir

        src = str(default_model_dir())

    if storage.is_remote(src):  # gs://: fetched once into the local cache, then read like a local dir
        path = storage.cached_copy(src)
    else:
        path = Path(src)
    if not path.exists() and _looks_like_hub_id(src):
        path = _download_from_hub(src)
    if not path.exists():
        raise SlayerError(f"{path}: not found; expected an HF model directory, a .gguf file or a slayer checkpoint")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SlayerError(f"{path}: unsupported file type '{path.suffix}'; expected a .gguf file or a directory")
        from slayer_jax.io.gguf import load_gguf

        return load_gguf(path, dtype=dtype, mesh=mesh)

    if is_model_checkpoint(path):
        return load_model(path, dtype=dtype, mesh=mesh)

    return load_hf(path, dtype=dtype, mesh=mesh)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    """safetensors + config + tokenizer files of a hub model (never pickles), when online."""

    if os.environ.get("HF_HUB_OFFLINE") == "1" and not os.environ.get("SLAYER_ALLOW_DOWNLOAD"):
        raise SlayerError(f"{repo_id}: not a local path, and the hub is offline (HF_HUB_OFFLINE=1); download it "
                          f"first or set SLAYER_ALLOW_DOWNLOAD=1 with network access")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*",
                                                               "*.jinja"]))
    except Exception as e:  # network, auth or missing repo
        raise SlayerError(f"{repo_id}: could not download from the hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
