"""HF-format directories <-> the canonical params pytree, one tensor at a time.

Import reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (never
pickled ``.bin`` files), checks every tensor's shape against ``config.json`` and turns each
one into a device array as soon as it is read, so peak host memory stays near one copy of
the model. Given a mesh, each tensor is built shard by shard from only the stored rows the
local devices need (see :func:`load_hf`), so a process of a multi-host job holds only its own
shards. Export streams tensors into ~5 GB shards inside a temporary directory and renames
it into place, so an interrupted export leaves nothing at the target.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from slayer_jax import storage
from slayer_jax.errors import SlayerError
from slayer_jax.io.safetensors_stream import SafetensorsFile, write_safetensors
from slayer_jax.modeling.config import ModelConfig, load_config, show_value
from slayer_jax.modeling.model import Params, as_dtype, merge_adapters
from slayer_jax.parallel import multihost
from slayer_jax.storage import staging_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some HF checkpoints carry that hold no parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_LAYER_TENSORS = (  # (our key, leaf, HF name under model.layers.{i}., transposed)
    ("attn_norm", "scale", "input_layernorm.weight", False),
    ("q_proj", "kernel", "self_attn.q_proj.weight", True),
    ("k_proj", "kernel", "self_attn.k_proj.weight", True),
    ("v_proj", "kernel", "self_attn.v_proj.weight", True),
    ("o_proj", "kernel", "self_attn.o_proj.weight", True),
    ("q_proj", "bias", "self_attn.q_proj.bias", False),
    ("k_proj", "bias", "self_attn.k_proj.bias", False),
    ("v_proj", "bias", "self_attn.v_proj.bias", False),
    ("o_proj", "bias", "self_attn.o_proj.bias", False),
    ("mlp_norm", "scale", "post_attention_layernorm.weight", False),
    ("gate_proj", "kernel", "mlp.gate_proj.weight", True),
    ("up_proj", "kernel", "mlp.up_proj.weight", True),
    ("down_proj", "kernel", "mlp.down_proj.weight", True),
    ("gate_proj", "bias", "mlp.gate_proj.bias", False),
    ("up_proj", "bias", "mlp.up_proj.bias", False),
    ("down_proj", "bias", "mlp.down_proj.bias", False),
)


def hf_tensor_map(cfg: ModelConfig, n_layers: int) -> Iterator[tuple[tuple, str, bool]]:
    """Yield (path in our tree, HF tensor name, transposed) for every parameter ``cfg`` implies.

    A path is a tuple of keys/indices, e.g. ("layers", 3, "q_proj", "kernel")."""
    yield ("embed", "embedding"), "model.embed_tokens.weight", False
    for i in range(n_layers):
        for key, leaf, name, transposed in _LAYER_TENSORS:
            if leaf == "bias":
                has = cfg.attention_bias if key in ("q_proj", "k_proj", "v_proj", "o_proj") else cfg.mlp_bias
                if not has:
                    continue
            yield ("layers", i, key, leaf), f"model.layers.{i}.{name}", transposed
    yield ("norm", "scale"), "model.norm.weight", False
    if not cfg.tie_word_embeddings:
        yield ("lm_head", "kernel"), "lm_head.weight", True


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _empty_tree(cfg: ModelConfig, n_layers: int) -> Params:
    tree: Params = {"embed": {}, "layers": [], "norm": {}}
    for _ in range(n_layers):
        tree["layers"].append({k: {} for k, *_ in _LAYER_TENSORS})
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {}
    return tree


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, F, H, K, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.vocab_size)
    return {"embed_tokens.weight": (V, D), "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
            "q_proj.weight": (H * Dh, D), "k_proj.weight": (K * Dh, D), "v_proj.weight": (K * Dh, D),
            "o_proj.weight": (D, H * Dh), "q_proj.bias": (H * Dh,), "k_proj.bias": (K * Dh,),
            "v_proj.bias": (K * Dh,), "o_proj.bias": (D,), "gate_proj.weight": (F, D), "up_proj.weight": (F, D),
            "down_proj.weight": (D, F), "gate_proj.bias": (F,), "up_proj.bias": (F,), "down_proj.bias": (D,),
            "norm.weight": (D,), "lm_head.weight": (V, D)}


def expected_hf_shape(cfg: ModelConfig, hf_name: str) -> tuple[int, ...]:
    shapes = _hf_shapes(cfg)
    for suffix, shape in shapes.items():
        if hf_name.endswith(suffix) and (suffix != "norm.weight" or hf_name == "model.norm.weight"):
            return shape
    raise KeyError(hf_name)


def _weight_files(path: Path) -> dict[str, SafetensorsFile]:
    """Map each tensor name to the opened file that holds it."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if index.exists():
        try:
            d = json.loads(index.read_bytes())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, a 4300-digit number, nested too deeply
            raise SlayerError(f"{index}: not valid JSON; expected an object with field 'weight_map'") from None
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict):
            shown = "missing" if not isinstance(d, dict) or "weight_map" not in d else type(weight_map).__name__
            raise SlayerError(f"{index}: field 'weight_map' is {shown}; expected an object of tensor name -> "
                              f"file name")
        for name, f in weight_map.items():  # a file beside the index, never a path elsewhere
            if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f or not f.isprintable():
                raise SlayerError(f"{index}: field 'weight_map.{json.dumps(name)[1:-1]}' is {show_value(f)}; "
                                  f"expected the name of a .safetensors file in the same directory")
        files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
        for name, f in weight_map.items():
            if name not in files[f].entries:
                raise SlayerError(f"{path / f}: tensor {name!r} is listed in {INDEX_FILE} but missing from the file")
        return {name: files[f] for name, f in weight_map.items()}
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {bins[0]}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
    raise SlayerError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def load_tokenizer(path: str | Path):
    """transformers AutoTokenizer from local files only, or None when the dir has none."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_hf(path: str | Path, dtype: Any = None, *, tokenizer: bool = True, mesh: Any = None,
            shardings: Any = None, progress: bool = True):
    """Import an HF Llama/Mistral directory. Returns (params, cfg, tokenizer_or_None).

    dtype: cast every tensor to this dtype (default: keep the stored dtype), block by block.
    mesh: a ``jax.sharding.Mesh``; every leaf becomes a global ``jax.Array`` with its role
        sharding (:func:`slayer_jax.parallel.sharding.param_shardings`), built by
        ``jax.make_array_from_callback`` from just the stored rows this process's devices need
        (a stored [out, in] kernel split on ``in`` still needs all its rows; they are read in
        chunks), so no process holds more than its shards plus one tensor's local blocks.
        Every process of a multi-host job must call it (same path, same mesh).
    shardings: instead of ``mesh``'s role rules, a tree of ``jax.sharding.Sharding`` shaped
        like the params.
    Without either, each tensor is read whole and placed with ``jnp.asarray`` on the default
    device.
    """
    path = Path(path)
    if not path.is_dir():
        raise SlayerError(f"{path}: not a directory; expected an HF model directory with config.json")
    cfg, n_layers = load_config(path)
    where = _weight_files(path)
    if n_layers > len(where):  # before anything is built per layer: a huge count must not exhaust memory
        raise SlayerError(f"{path / 'config.json'}: field 'num_hidden_layers' is {n_layers}; the weights hold "
                          f"{len(where)} tensors, too few for that many layers")
    dtype = None if dtype is None else np.dtype(as_dtype(dtype))
    if shardings is None and mesh is not None:
        from slayer_jax.modeling.model import expected_shapes
        from slayer_jax.parallel.sharding import param_shardings

        shardings = param_shardings(expected_shapes(cfg, n_layers), mesh)

    params = _empty_tree(cfg, n_layers)
    wanted = list(hf_tensor_map(cfg, n_layers))
    wanted_names = {name for _, name, _ in wanted}
    for name, f in where.items():
        if name in wanted_names or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some exporters write the tied head too; it is the embedding
        raise SlayerError(f"{f.path}: unexpected tensor {name!r} (config.json says {n_layers} layers, "
                          f"attention_bias={cfg.attention_bias}, mlp_bias={cfg.mlp_bias})")
    for tree_path, name, transposed in tqdm(wanted, desc=f"import {path.name}", unit="tensor",
                                             disable=None if progress else True, file=sys.stderr):
        if name not in where:
            raise SlayerError(f"{path}: tensor '{name}' is missing from the weights (config.json implies it)")
        f = where[name]
        shape, expect = f.shape(name), expected_hf_shape(cfg, name)
        if shape != expect:
            raise SlayerError(f"{f.path}: tensor '{name}' has shape {list(shape)}; config.json implies {list(expect)}")
        ours = tuple(shape[::-1]) if transposed else tuple(shape)
        if shardings is None:
            leaf = jnp.asarray(_read_blocks(f, name, transposed, dtype, ours, [()])(()))
        else:
            sharding = _get(shardings, tree_path)
            indices = list(sharding.addressable_devices_indices_map(ours).values())
            leaf = jax.make_array_from_callback(ours, sharding,
                                                _read_blocks(f, name, transposed, dtype, ours, indices))
        _set(params, tree_path, leaf)
        del leaf
    for layer in params["layers"]:
        for k in [k for k, v in layer.items() if not v]:
            del layer[k]
    tok = load_tokenizer(path) if tokenizer else None
    return params, cfg, tok


def _read_blocks(f: SafetensorsFile, name: str, transposed: bool, dtype: np.dtype | None, shape: tuple[int, ...],
                 indices: list[tuple]) -> Callable[[tuple], np.ndarray]:
    """``block(index)`` for each of ``indices``: the C-contiguous block of tensor ``name`` in our
    layout ([in, out] for a transposed kernel), cast to ``dtype``. All blocks are read up front in
    one pass over the stored rows they need (a transposed kernel's stored rows are our columns),
    each distinct block once, so devices holding the same replica share it."""
    key = lambda index: tuple(i.indices(n) for i, n in zip(tuple(index) + (slice(None),) * len(shape), shape))
    distinct = {key(i): tuple(i) for i in indices}
    stored = [tuple(i) + (slice(None),) * (len(shape) - len(i)) for i in distinct.values()]
    if transposed:  # our [in, out] block is the stored [out, in] block, transposed
        stored = [i[::-1] for i in stored]
    raw = f.read_blocks(name, stored)[::-1]
    blocks = {}
    for k in distinct:
        arr = raw.pop()  # drop each stored block once converted
        if transposed:
            arr = np.ascontiguousarray(arr.T)
        blocks[k] = arr if dtype is None else arr.astype(dtype, copy=False)
        del arr
    return lambda index: blocks[key(index)]


def _host_copy(x: Any) -> np.ndarray:
    """One tensor on this host: a plain fetch, or an all-gather when it spans several hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _dtype_name(dt: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(np.dtype(dt).name, "float32")


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | Path, tokenizer: Any = None,
            extra_config: dict | None = None, shard_bytes: int = 5_000_000_000, overwrite: bool = False,
            dtype: Any = None, progress: bool = True) -> Path:
    """Write an HF directory that transformers loads, atomically (temp dir, then rename).

    ``num_hidden_layers`` is ``len(params["layers"])``. ``extra_config`` is merged into
    config.json (e.g. ``{"slayer": plan_record}``). Tensors are streamed one at a time into
    safetensors shards of at most ``shard_bytes`` (an index json when there is more than one).
    ``out_dir`` may be gs://: the directory is written to a local temporary directory, then
    uploaded (:func:`slayer_jax.storage.copy_tree`).
    """

    if storage.is_remote(out_dir):
        remote = storage.as_path(out_dir)
        if remote.exists() and not overwrite:  # every process sees the same bucket: all raise alike
            raise SlayerError(f"{remote}: already exists; pass overwrite=True (--overwrite) to replace it")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="slayer_export_") as staging:
            local = save_hf(params, cfg, Path(staging) / "export", tokenizer=tokenizer, extra_config=extra_config,
                            shard_bytes=shard_bytes, dtype=dtype, progress=progress)
            with multihost.together(f"export to {remote}"):  # the others wait for the upload, and learn its fate
                if jax.process_index() == 0:
                    storage.copy_tree(local, remote)
        return remote
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SlayerError(f"{out_dir}: already exists; pass overwrite=True (--overwrite) to replace it")
    params = merge_adapters(params)  # an HF model has no LoRA adapters: each is folded into its kernel
    n_layers = len(params["layers"])
    entries = list(hf_tensor_map(cfg, n_layers))
    for tree_path, name, transposed in entries:  # validate the tree before writing anything
        try:
            leaf = _get(params, tree_path)
        except (KeyError, IndexError):
            raise SlayerError(f"params: missing leaf {'/'.join(map(str, tree_path))} (needed for {name})") from None
        want = expected_hf_shape(cfg, name)
        got = tuple(leaf.shape[::-1]) if transposed else tuple(leaf.shape)
        if got != want:
            raise SlayerError(f"params: leaf {'/'.join(map(str, tree_path))} has shape {list(leaf.shape)}; "
                              f"config implies {name} {list(want)}")
    out_dtype = None if dtype is None else np.dtype(as_dtype(dtype))

    def spec(tree_path, name, transposed):
        leaf = _get(params, tree_path)
        shape = tuple(leaf.shape[::-1]) if transposed else tuple(leaf.shape)
        return name, shape, out_dtype or np.dtype(leaf.dtype)

    specs = [spec(*e) for e in entries]
    transposed_of = {name: (tp, tr) for tp, name, tr in entries}
    shards: list[list[tuple]] = [[]]
    size = 0
    for s in specs:
        nbytes = int(np.prod(s[1], dtype=np.int64)) * s[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    bar = tqdm(total=len(specs), desc=f"export {out_dir.name}", unit="tensor", disable=None if progress else True, file=sys.stderr)

    gathered = [0]

    def get(name: str) -> np.ndarray:
        tree_path, transposed = transposed_of[name]
        arr = _host_copy(_get(params, tree_path))
        gathered[0] += 1
        if transposed:
            arr = arr.T
        if out_dtype is not None:
            arr = arr.astype(out_dtype)
        bar.update(1)
        return arr

    if jax.process_count() > 1 and jax.process_index() != 0:
        for s in specs:  # take part in each tensor's all-gather; process 0 writes
            _host_copy(_get(params, transposed_of[s[0]][0]))
        multihost.agree(None)  # process 0's outcome: raised here too if its write failed
        return out_dir
    try:
        storage.require_free_space(out_dir, sum(int(np.prod(sp[1], dtype=np.int64)) * sp[2].itemsize
                                                for sp in specs), "the HF export")
        _write_hf_dir(out_dir, names, shards, specs, get, bar, cfg, n_layers, extra_config, tokenizer)
    except BaseException as e:
        storage.name_failed_write(e, out_dir)
        if jax.process_count() > 1:  # keep the all-gathers in step with the other processes, then fail together
            for s in specs[gathered[0]:]:
                _host_copy(_get(params, transposed_of[s[0]][0]))
            multihost.agree(f"export {out_dir}: {type(e).__name__}: {e}")
        raise
    multihost.agree(None)
    return out_dir


def _write_hf_dir(out_dir: Path, names, shards, specs, get, bar, cfg: ModelConfig, n_layers: int,
                  extra_config: dict | None, tokenizer: Any) -> None:
    """Process 0's part of :func:`save_hf`: the files, into a temporary directory renamed into place."""
    tmp = staging_path(out_dir)
    tmp.mkdir(parents=True)
    try:
        total = 0
        weight_map = {}
        for fname, shard in zip(names, shards):
            total += write_safetensors(tmp / fname, shard, get, metadata={"format": "pt"})
            weight_map.update({s[0]: fname for s in shard})
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(int(np.prod(s[1])) * s[2].itemsize for s in specs)},
                     "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config = cfg.to_hf_dict(n_layers)
        config["torch_dtype"] = _dtype_name(specs[0][2])
        config.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: v for k, v in (("bos_token_id", config["bos_token_id"]), ("eos_token_id", config["eos_token_id"]),
                                 ("pad_token_id", config["pad_token_id"])) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            old = staging_path(out_dir, "old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
