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

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from slayer_jax import storage
from slayer_jax.errors import SlayerError, first_line
from slayer_jax.io.hf import load_tokenizer
from slayer_jax.modeling.config import ModelConfig, load_config
from slayer_jax.modeling.model import Params, expected_shapes
from slayer_jax.parallel.multihost import replicated_value, together

PARAMS_DIR = "params"


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / "config.json").exists()


def save_model(path: str | Path, params: Params, cfg: ModelConfig, tokenizer: Any = None,
               extra_config: dict | None = None, overwrite: bool = False) -> Path:


    if storage.is_remote(path):  # gs://: written locally, then uploaded
        import tempfile

        remote = storage.as_path(path)
        if remote.exists() and not overwrite:
            raise SlayerError(f"{remote}: already exists; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="slayer_ckpt_") as staging:
            save_model(Path(staging) / "model", params, cfg, tokenizer=tokenizer, extra_config=extra_config)
            storage.copy_tree(Path(staging) / "model", remote)
        return remote
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise SlayerError(f"{path}: already exists; pass --overwrite to replace it")
    storage.require_free_space(path, sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params)), "the checkpoint")
    tmp = storage.staging_path(path)
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            try:
                ckptr.save(tmp / PARAMS_DIR, params)
                ckptr.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - tensorstore reports ENOSPC/EROFS as ValueError
                if isinstance(e, (OSError, SlayerError)):
                    raise
                raise SlayerError(f"{path}: writing the checkpoint failed ({_write_error(e)}); "
                                  f"nothing was replaced") from None
        config = cfg.to_hf_dict(len(params["layers"])) | (extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        storage.name_failed_write(e, path)
        raise
    return path


def _write_error(e: BaseException) -> str:
    """What a failed orbax write says, short: tensorstore ends a failed file write with
    ``[os_error_code='28']``, which names the cause better than its 500-character message."""
    m = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(m.group(1))) if m else first_line(e)[:300]


def load_model(path: str | Path, dtype: Any = None, mesh: Any = None):
    """Returns (params, cfg, tokenizer_or_None) from a model checkpoint directory.

    mesh: restore every leaf as a global ``jax.Array`` with its role sharding
    (:func:`slayer_jax.parallel.sharding.param_shardings`); orbax then reads only the local shards."""

    path = Path(path).absolute()
    if not is_model_checkpoint(path):
        raise SlayerError(f"{path}: not a slayer checkpoint (expected config.json and {PARAMS_DIR}/)")
    cfg, n_layers = load_config(path)
    with ocp.StandardCheckpointer() as ckptr:
        try:  # orbax's own files (JSON, OCDBT): any damage surfaces as one of many exception types
            meta = ckptr.metadata(path / PARAMS_DIR)
            tree_meta = getattr(meta, "item_metadata", meta)
            saved = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree_meta)[0]}
        except Exception as e:  # noqa: BLE001
            raise SlayerError(f"{path / PARAMS_DIR}: unreadable checkpoint metadata ({first_line(e)[:200]}); "
                              f"expected the orbax files `slayer convert --to checkpoint` writes") from None
        if not saved:  # orbax logs a warning and returns nothing when its metadata files are damaged
            raise SlayerError(f"{path / PARAMS_DIR}: unreadable checkpoint metadata (it lists no arrays); expected "
                              f"the orbax files `slayer convert --to checkpoint` writes")
        if n_layers > len(saved):  # before anything is built per layer: a huge count must not exhaust memory
            raise SlayerError(f"{path / 'config.json'}: field 'num_hidden_layers' is {n_layers}; the checkpoint "
                              f"holds {len(saved)} arrays, too few for that many layers")
        abstract = expected_shapes(cfg, n_layers)
        want = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        for key in sorted(set(saved) | set(want)):
            shape = getattr(saved.get(key), "shape", None)
            if key not in want or shape is None or tuple(shape) != tuple(want[key].shape):
                raise SlayerError(f"{path / PARAMS_DIR}: leaf {key} does not match config.json "
                                  f"({n_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")
        shardings = {}
        if mesh is not None:
            from slayer_jax.parallel.sharding import param_shardings

            shardings = {jax.tree_util.keystr(p): s
                         for p, s in jax.tree_util.tree_flatten_with_path(param_shardings(abstract, mesh))[0]}
        target = jax.tree_util.tree_map_with_path(
            lambda p, a: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype) if dtype is not None
                                              else saved[jax.tree_util.keystr(p)].dtype,
                                              sharding=shardings.get(jax.tree_util.keystr(p))), abstract)
        try:
            params = ckptr.restore(path / PARAMS_DIR, target)
        except Exception as e:  # noqa: BLE001 - tensorstore reports damaged data as a plain Exception
            raise SlayerError(f"{path / PARAMS_DIR}: cannot be restored ({first_line(e)[:200]}); the checkpoint's "
                              f"files are damaged or truncated") from None
    return params, cfg, load_tokenizer(path)


# ----------------------------------------------------------------------------- training checkpoints
HASH_VERSION = "v2:"  # v1 (before multi-process training): sha256 of the fetched bytes, no prefix


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two 32-bit position-weighted sums of a leaf's bits, computed where the leaf lives. Integer
    sums wrap exactly, so the result does not depend on how the leaf is sharded or reduced."""

    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).reshape(-1).astype(jnp.uint32)
    i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    mix = (i * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15))
    mix = (mix ^ (mix >> 15)) * jnp.uint32(0x85EBCA6B)
    mix = mix ^ (mix >> 13)
    return jnp.stack([jnp.sum(bits * (mix | jnp.uint32(1)), dtype=jnp.uint32),
                      jnp.sum((bits ^ mix) * jnp.uint32(0xC2B2AE35) + i, dtype=jnp.uint32)])


def tree_hash(tree: Any) -> str:
    """The identity of a frozen base: sha256 over each leaf's path, dtype, shape and a 64-bit
    checksum of its bits computed on its devices. Nothing is fetched to the host, so it works on
    arrays sharded over several processes (each process gets the same answer), and it equals the
    single-process value for the same weights."""

    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sums = replicated_value(_leaf_checksum(x))
        h.update(f"{jax.tree_util.keystr(path)}|{np.dtype(x.dtype)}|{tuple(x.shape)}|".encode())
        h.update(np.ascontiguousarray(sums).tobytes())
    return HASH_VERSION + h.hexdigest()


class TrainCheckpointer:
    """orbax ``CheckpointManager`` for training: per step it saves

    - ``state``: step, trainable params, optimizer state and RNG (the frozen base is *not*
      copied: it is referenced by ``meta.base`` and its content hash, checked on restore);
    - ``data``: every process's grain iterator state (grain's orbax handler, one JSON file per
      process), so the data order resumes exactly;
    - ``meta``: model config, surgery plan and layer map, base model path and hash.

    Saves are async (orbax), keep the newest ``keep`` steps, and are atomic: orbax writes to a
    temporary directory and renames on commit, so a save killed mid-write leaves the previous
    checkpoint as the latest restorable one.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):

        self.directory = epath.Path(directory if str(directory).startswith("gs://") else Path(directory).absolute())
        try:  # orbax reads every step's metadata here; it lets a damaged file's odd errors through
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True),
            )
        except (ValueError, RecursionError) as e:
            raise SlayerError(f"{self.directory}: a checkpoint's metadata is unreadable ({first_line(e)[:200]}); "
                              f"expected the files orbax writes (remove the damaged step)") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader: Any, meta: dict) -> None:
        """``loader``: the grain iterator; each process writes its own iterator state
        (grain's orbax handler: ``data/process_I-of-N.json``)."""

        self.wait()  # the previous save's failure surfaces here, as one line, not in orbax's save
        with together(f"checkpoint step {step}"):  # one process short of space stops them all
            storage.require_free_space(self.directory, sum(int(getattr(x, "nbytes", 0))
                                                           for x in jax.tree_util.tree_leaves(state)),
                                       f"the step-{step} checkpoint")
        with self._failures(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=grain.checkpoint.CheckpointSave(loader),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: Any, loader: Any, meta: dict, step: int | None = None) -> tuple[Any, int]:
        """Restore (state, step) and set ``loader`` (this process's iterator) to where it was,
        refusing a checkpoint of another model or plan."""

        step = self.latest_step() if step is None else step
        if step is None:
            raise SlayerError(f"{self.directory}: no checkpoint to restore")
        where = f"{self.directory}/{step}"
        try:
            saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax reports a damaged file as any of many types
            raise SlayerError(f"{where}/meta: unreadable ({first_line(e)[:200]}); expected the JSON a training "
                              f"checkpoint stores") from None
        if not isinstance(saved_meta, dict):
            raise SlayerError(f"{where}/meta: a JSON {type(saved_meta).__name__}; expected the object a training "
                              f"checkpoint stores")
        meta = json.loads(json.dumps(meta, default=str))  # tuples -> lists, as stored
        old = saved_meta.get("base_hash")
        if old and str(meta.get("base_hash")).startswith(HASH_VERSION) and not str(old).startswith(HASH_VERSION):
            raise SlayerError(f"{self.directory}/{step}: checkpoint written by an older slayer_jax (base hash format v1, "
                              f"data iterator state not per process); it cannot be resumed: start a new workdir")
        for key in ("plan", "layer_map", "model_config", "trainable", "base_hash"):
            if saved_meta.get(key) != meta.get(key):
                raise SlayerError(f"{self.directory}/{step}: checkpoint field '{key}' does not match this run "
                                  f"(saved {_short(saved_meta.get(key))}, now {_short(meta.get(key))})")
        data_dir = self.directory / str(step) / "data"
        mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not mine.exists():
            saved = sorted(p.name for p in data_dir.glob("process_*.json")) if data_dir.exists() else []
            raise SlayerError(f"{data_dir}: no data iterator state for process {jax.process_index()} of "
                              f"{jax.process_count()} (found {saved or 'none'}); resume with the process count "
                              f"that wrote it, or start a new workdir")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(loader)))
        except Exception as e:  # noqa: BLE001 - tensorstore and grain report damaged files as plain Exceptions
            raise SlayerError(f"{where}: cannot be restored ({first_line(e)[:200]}); the checkpoint's files are "
                              f"damaged or truncated") from None
        return restored["state"], step

    @contextlib.contextmanager
    def _failures(self, step: int | None = None):
        """A failed write (a full or read-only disk; tensorstore reports them as ValueError) as one
        line naming the checkpoint directory and the newest step that is still intact."""
        try:
            yield
        except Exception as e:  # noqa: BLE001
            if isinstance(e, SlayerError):
                raise
            intact = self.manager.latest_step()
            raise SlayerError(f"{self.directory}: saving a checkpoint failed ({_write_error(e)}); "
                              f"the newest intact checkpoint is step {intact}") from None

    def wait(self) -> None:
        with self._failures():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _short(x: Any, n: int = 80) -> str:
    s = json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."
