"""slayer model checkpoints: an orbax params tree plus the HF config and the slayer record.

Layout of a model checkpoint directory::

    CKPT/
      config.json      # HF config (num_hidden_layers = len(layers)), with an optional "slayer" key
      params/          # orbax StandardCheckpointer tree, same structure as the canonical params
      tokenizer*.json  # tokenizer files, when known

The training checkpoints of ``train.py`` (optimizer state, data iterator, step) build on the
same pieces. Written to a temporary directory and renamed, like every output here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from slayer_jax.config import ModelConfig, load_config
from slayer_jax.errors import SlayerError
from slayer_jax.model import Params

PARAMS_DIR = "params"


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / "config.json").exists()


def save_model(path: str | Path, params: Params, cfg: ModelConfig, tokenizer: Any = None,
               extra_config: dict | None = None, overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise SlayerError(f"{path}: already exists; pass --overwrite to replace it")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        config = cfg.to_hf_dict(len(params["layers"])) | (extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path: str | Path, dtype: Any = None):
    """Returns (params, cfg, tokenizer_or_None) from a model checkpoint directory."""
    import orbax.checkpoint as ocp

    from slayer_jax.io.hf import load_tokenizer
    from slayer_jax.model import expected_shapes

    path = Path(path).absolute()
    if not is_model_checkpoint(path):
        raise SlayerError(f"{path}: not a slayer checkpoint (expected config.json and {PARAMS_DIR}/)")
    cfg, n_layers = load_config(path)
    abstract = expected_shapes(cfg, n_layers)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / PARAMS_DIR)
        tree_meta = getattr(meta, "item_metadata", meta)
        saved = jax.tree_util.tree_map(lambda m: tuple(m.shape), tree_meta)
        want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
        if jax.tree_util.tree_structure(saved) != jax.tree_util.tree_structure(want) or saved != want:
            raise SlayerError(f"{path / PARAMS_DIR}: saved tree does not match config.json "
                              f"({n_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")
        target = jax.tree_util.tree_map(
            lambda a, m: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype) if dtype is not None else m.dtype),
            abstract, tree_meta)
        params = ckptr.restore(path / PARAMS_DIR, target)
    return params, cfg, load_tokenizer(path)
