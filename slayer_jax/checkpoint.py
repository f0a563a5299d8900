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
        saved = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree_meta)[0]}
        want = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        for key in sorted(set(saved) | set(want)):
            if key not in saved or key not in want or tuple(saved[key].shape) != tuple(want[key].shape):
                raise SlayerError(f"{path / PARAMS_DIR}: leaf {key} does not match config.json "
                                  f"({n_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")
        target = jax.tree_util.tree_map_with_path(
            lambda p, a: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype) if dtype is not None
                                              else saved[jax.tree_util.keystr(p)].dtype), abstract)
        params = ckptr.restore(path / PARAMS_DIR, target)
    return params, cfg, load_tokenizer(path)


# ----------------------------------------------------------------------------- training checkpoints
def tree_hash(tree: Any) -> str:
    """sha256 over the leaves' paths, dtypes, shapes and bytes: the identity of a frozen base."""
    import hashlib

    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(x))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


class TrainCheckpointer:
    """orbax ``CheckpointManager`` for training: per step it saves

    - ``state``: step, trainable params, optimizer state and RNG (the frozen base is *not*
      copied: it is referenced by ``meta.base`` and its content hash, checked on restore);
    - ``data``: the grain iterator state (JSON), so the data order resumes exactly;
    - ``meta``: model config, surgery plan and layer map, base model path and hash.

    Saves are async (orbax), keep the newest ``keep`` steps, and are atomic: orbax writes to a
    temporary directory and renames on commit, so a save killed mid-write leaves the previous
    checkpoint as the latest restorable one.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: Any, meta: dict, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore (state, data_state, step), refusing a checkpoint of another model or plan."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise SlayerError(f"{self.directory}: no checkpoint to restore")
        saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        meta = json.loads(json.dumps(meta, default=str))  # tuples -> lists, as stored
        for key in ("plan", "layer_map", "model_config", "trainable", "base_hash"):
            if saved_meta.get(key) != meta.get(key):
                raise SlayerError(f"{self.directory}/{step}: checkpoint field '{key}' does not match this run "
                                  f"(saved {_short(saved_meta.get(key))}, now {_short(meta.get(key))})")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(x: Any, n: int = 80) -> str:
    s = json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."
