"""Loading weights straight into their shards: ``SafetensorsFile.read_slice`` and ``load_any(mesh=...)``.

References: ``read()[index]`` for slices (and a counting file wrapper for the bytes read); the
plain, unsharded load for values; ``slayer_jax.parallel.sharding.param_shardings`` for placement; two
JAX processes (``jax.distributed``) over 2 simulated CPU devices each for the multi-host case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import multiproc as mp
import numpy as np
import pytest
from tiny_hf import make_hf_model

from slayer_jax.errors import SlayerError
from slayer_jax.io import load_any
from slayer_jax.io import safetensors_stream as st
from slayer_jax.io.hf import load_hf
from slayer_jax.modeling.model import expected_shapes
from slayer_jax.parallel.sharding import make_mesh, param_shardings

REPO = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- read_slice
def _write(path, tensors: dict[str, np.ndarray]) -> st.SafetensorsFile:
    st.write_safetensors(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    return st.SafetensorsFile(path)


def _random_slice(rng, n: int) -> slice:
    kind = rng.integers(4)
    if kind == 0:
        return slice(None)
    a, b = sorted(rng.integers(0, n + 1, size=2))
    return slice(int(a), int(b), int(rng.integers(1, 4)) if kind == 3 else None)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "f32"])
@pytest.mark.parametrize("chunk", [64 << 20, 100], ids=["one_chunk", "many_chunks"])
def test_read_slice_equals_read_then_slice(tmp_path, monkeypatch, dtype, chunk):
    monkeypatch.setattr(st.SafetensorsFile, "CHUNK_BYTES", chunk)
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((37, 24)).astype(dtype), "v": rng.standard_normal(29).astype(dtype),
               "t": rng.standard_normal((5, 6, 7)).astype(dtype), "s": np.asarray(3.5, dtype)}
    f = _write(tmp_path / "m.safetensors", tensors)
    for name, full in tensors.items():
        np.testing.assert_array_equal(f.read(name), full)
        for _ in range(40):
            index = tuple(_random_slice(rng, n) for n in full.shape[: rng.integers(0, full.ndim + 1)])
            got = f.read_slice(name, index)
            assert got.dtype == dtype and got.flags.c_contiguous
            np.testing.assert_array_equal(got, full[index])
    np.testing.assert_array_equal(f.read_slice("w", (slice(3, 9), slice(20, 24))), tensors["w"][3:9, 20:24])
    np.testing.assert_array_equal(f.read_slice("w", (slice(5, 5),)), tensors["w"][5:5])


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "f32"])
def test_read_slice_reads_only_the_rows_it_needs(tmp_path, monkeypatch, dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(dtype)
    path = tmp_path / "m.safetensors"
    f = _write(path, {"pad": np.zeros(1000, dtype), "w": w})
    counted = []

    class Counting:  # wraps every file the module opens; counts the bytes readinto returns
        def __init__(self, *a, **k):
            self._f = open(*a, **k)  # noqa: SIM115 (closed by __exit__)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def seek(self, *a):
            return self._f.seek(*a)

        def readinto(self, b):
            n = self._f.readinto(b)
            counted.append(n)
            return n

    monkeypatch.setattr(st, "open", Counting, raising=False)
    row = 48 * dtype.itemsize
    cases = [((slice(16, 32),), 16 * row),  # whole rows: one pread of 16 rows
             ((slice(16, 32), slice(12, 24)), 16 * row),  # a block: the same rows, then the columns
             ((slice(None), slice(0, 12)), 64 * row),  # a column block needs every row
             ((slice(40, 41),), row)]
    for index, expect in cases:
        counted.clear()
        before = f.bytes_read
        np.testing.assert_array_equal(f.read_slice("w", index), w[index])
        assert sum(counted) == expect == f.bytes_read - before, (index, counted)
    counted.clear()
    f.read("w")
    assert sum(counted) == w.nbytes


def test_read_slice_validates_like_read(tmp_path):
    f = _write(tmp_path / "m.safetensors", {"w": np.zeros((4, 4), np.float32)})
    with pytest.raises(IndexError, match="slices"):
        f.read_slice("w", (slice(None),) * 3)
    with pytest.raises(IndexError, match="slices"):
        f.read_slice("w", (1,))
    with pytest.raises(IndexError, match="step"):
        f.read_slice("w", (slice(None, None, -1),))
    f.entries["w"]["shape"] = [4, 5]  # header disagrees with the byte range
    with pytest.raises(SlayerError, match="needs"):
        f.read_slice("w", (slice(0, 1),))
    f.entries["w"] = {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]}
    with pytest.raises(SlayerError, match="dtype F8_E4M3"):
        f.read_slice("w", (slice(0, 1),))
    g = _write(tmp_path / "n.safetensors", {"w": np.zeros((4, 4), np.float32)})
    with open(g.path, "r+b") as h:
        h.truncate(g.file_size - 8)  # the last row is cut short after the header was read
    np.testing.assert_array_equal(g.read_slice("w", (slice(0, 2),)), np.zeros((2, 4), np.float32))
    with pytest.raises(SlayerError, match="truncated"):
        g.read_slice("w", (slice(2, 4),))


# ----------------------------------------------------------------------------- load_hf / load_any with a mesh
def write_tiny_hf(d: Path, variant: str = "llama2", dtype: str = "bfloat16") -> Path:
    import torch

    model = make_hf_model(variant)
    model.to(getattr(torch, dtype)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("fsdp=4,tensor=2", devices=jax.devices()[:8])


def _check_placed(sharded, plain, mesh, cfg):
    want = param_shardings(expected_shapes(cfg, len(plain["layers"])), mesh)
    flat_s, tree_s = jax.tree_util.tree_flatten_with_path(sharded)
    flat_p, tree_p = jax.tree_util.tree_flatten(plain)
    assert tree_s == tree_p
    for (path, x), ref, sh in zip(flat_s, flat_p, jax.tree_util.tree_leaves(want)):
        assert isinstance(x, jax.Array) and x.shape == ref.shape and x.dtype == ref.dtype, path
        assert x.sharding == sh, (jax.tree_util.keystr(path), x.sharding, sh)
        assert len(x.addressable_shards) == 8
        for s in x.addressable_shards:
            assert s.data.shape == sh.shard_shape(x.shape), path
            np.testing.assert_array_equal(np.asarray(s.data), np.asarray(ref)[s.index])
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))


@pytest.mark.parametrize("variant", ["llama2", "rope_linear_biases", "tied_embeddings"])
@pytest.mark.parametrize("dtype", [None, "float32"], ids=["stored_bf16", "to_f32"])
def test_load_hf_with_mesh_places_role_shards(tmp_path, mesh, variant, dtype):
    d = write_tiny_hf(tmp_path / "hf", variant)
    plain, cfg, _ = load_hf(d, dtype=dtype, progress=False)
    sharded, cfg2, _ = load_hf(d, dtype=dtype, mesh=mesh, progress=False)
    assert cfg2 == cfg
    assert jax.tree_util.tree_leaves(plain)[0].dtype == (jnp.bfloat16 if dtype is None else jnp.float32)
    _check_placed(sharded, plain, mesh, cfg)
    # the split really happens: a kernel is split 8 ways (fsdp x tensor), so each device holds 1/8
    q = sharded["layers"][0]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size * 8 == q.size


def test_load_any_with_mesh_from_checkpoint_and_gguf(tmp_path, mesh):
    from test_gguf import make_torch_llama, write_llama_gguf

    from slayer_jax.io.checkpoint import save_model

    d = write_tiny_hf(tmp_path / "hf", "rope_linear_biases")
    plain, cfg, _ = load_any(d, dtype="float32")
    save_model(tmp_path / "ckpt", plain, cfg)
    for dtype in (None, jnp.bfloat16):
        ref = jax.tree_util.tree_map(lambda x, dt=dtype: x.astype(dt or x.dtype), plain)
        sharded, cfg2, _ = load_any(tmp_path / "ckpt", dtype=dtype, mesh=mesh)
        assert cfg2 == cfg
        _check_placed(sharded, ref, mesh, cfg)

    g = tmp_path / "tiny.gguf"
    write_llama_gguf(g, make_torch_llama(num_hidden_layers=2))
    plain, cfg, _ = load_any(g)
    sharded, _, _ = load_any(g, mesh=mesh)
    _check_placed(sharded, plain, mesh, cfg)


def test_load_hf_reads_each_stored_row_once(tmp_path, monkeypatch):
    """Plain or sharded, every stored byte is read once: blocks of a device row share one read."""
    d = write_tiny_hf(tmp_path / "hf", "llama2", dtype="float32")
    f = st.SafetensorsFile(d / "model.safetensors")
    tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in f.entries.values())
    read = []
    real = st.SafetensorsFile._pread
    monkeypatch.setattr(st.SafetensorsFile, "_pread",
                        lambda self, f, off, buf, name: (read.append(buf.nbytes), real(self, f, off, buf, name)))
    for spec in (None, "data=8", "fsdp=4,tensor=2", "fsdp=8", "tensor=2,data=4"):
        read.clear()
        load_hf(d, mesh=spec and make_mesh(spec), progress=False)
        assert sum(read) == tensor_bytes, spec


# ----------------------------------------------------------------------------- two JAX processes
CHILD = r"""
import hashlib, json, sys
import jax
import numpy as np

from slayer_jax.parallel.multihost import initialize

assert initialize()  # from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID the launcher sets
hf_dir, out = sys.argv[1], sys.argv[2].format(jax.process_index())
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2

from slayer_jax.io import load_any
from slayer_jax.io import safetensors_stream as st
from slayer_jax.parallel.sharding import make_mesh

read = [0]
real = st.SafetensorsFile._pread
def counting(self, f, off, buf, name):
    read[0] += buf.nbytes
    return real(self, f, off, buf, name)
st.SafetensorsFile._pread = counting

mesh = make_mesh("fsdp=4")
params, cfg, _ = load_any(hf_dir, dtype="float32", mesh=mesh)
leaves = {}
for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaves[jax.tree_util.keystr(path)] = {
        "shape": list(x.shape), "dtype": str(x.dtype), "spec": [a for a in x.sharding.spec],
        "fully_addressable": x.is_fully_addressable,
        "bytes": sum(s.data.nbytes for s in x.addressable_shards),
        "shards": [{"process": s.device.process_index, "index": [[i.start, i.stop] for i in s.index],
                    "sha": hashlib.sha256(np.ascontiguousarray(np.asarray(s.data)).tobytes()).hexdigest()}
                   for s in x.addressable_shards]}
json.dump({"process": jax.process_index(), "read": read[0], "leaves": leaves}, open(out, "w"))
jax.distributed.shutdown()
"""


def run_two_processes(script: str, args: list[str], logdir: Path, timeout: float = 180.0) -> None:
    """``script`` as processes 0 and 1 of a 2-process JAX job on the CPU (2 devices each); a
    timeout kills both, so nothing can hang the suite."""
    procs = mp.start(["-c", script, *args], 2, 2, logdir)
    assert mp.wait(procs, timeout) == [0, 0], mp.logs(logdir, 2)


def test_two_processes_each_read_and_hold_only_their_shards(tmp_path):
    d = write_tiny_hf(tmp_path / "hf", "llama2", dtype="bfloat16")
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    run_two_processes(CHILD, [str(d), str(tmp_path / "p{}.json")], tmp_path / "logs")
    reports = [json.loads(o.read_text()) for o in outs]
    plain, _, _ = load_hf(d, dtype="float32", progress=False)
    ref = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(plain)[0]}
    file_bytes = (d / "model.safetensors").stat().st_size
    held = [0, 0]
    for i, rep in enumerate(reports):
        assert rep["process"] == i
        assert set(rep["leaves"]) == set(ref)
        for key, leaf in rep["leaves"].items():
            full = ref[key]
            assert leaf["shape"] == list(full.shape) and leaf["dtype"] == "float32"
            # a global array over 4 devices of 2 processes is never fully addressable here
            assert not leaf["fully_addressable"], key
            sharded = any(a is not None for a in leaf["spec"])
            assert sharded == (key.endswith("['kernel']") or "embed" in key), (key, leaf["spec"])
            assert leaf["bytes"] == (full.nbytes // 2 if sharded else 2 * full.nbytes), key
            assert [s["process"] for s in leaf["shards"]] == [i, i]
            for s in leaf["shards"]:
                block = full[tuple(slice(a, b) for a, b in s["index"])]
                assert s["sha"] == hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest(), (key, s)
            held[i] += leaf["bytes"]
        # each process read at most the file (replicated norms and column-split tensors need whole rows)
        assert 0 < rep["read"] < file_bytes
    for key, leaf in reports[0]["leaves"].items():  # the 4 shards of a split leaf are 4 distinct blocks
        if any(leaf["spec"]):
            blocks = {json.dumps(s["index"]) for rep in reports for s in rep["leaves"][key]["shards"]}
            assert len(blocks) == 4, key
    # the two processes together hold one copy of every sharded leaf
    sharded_bytes = sum(ref[k].nbytes for k, leaf in reports[0]["leaves"].items() if any(leaf["spec"]))
    repl_bytes = sum(ref[k].nbytes for k, leaf in reports[0]["leaves"].items() if not any(leaf["spec"]))
    assert held[0] + held[1] == sharded_bytes + 4 * repl_bytes
