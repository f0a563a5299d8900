"""gs:// storage for real: orbax checkpoints, text files, directories and TensorBoard logs round-trip
through a local GCS emulator (fake-gcs-server, started by the ``gcs_bucket`` fixture of
tests/gcs_emulator.py). Nothing is mocked; each test also checks the objects on the bucket with
gcsfs and that no local ``./gs:`` directory appeared."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from slayer_jax import storage


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run in an empty cwd so that a gs:// URL mistaken for a local path is caught."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written to the local disk"


def _objects(url: str) -> list[str]:
    """Keys under ``url`` on the bucket, relative to it (a listing of the emulator, not of epath)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(k[len(root) + 1:] for k in fs.find(root))


# ----------------------------------------------------------------------------- (a) orbax
def _state(step: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devs = np.array(jax.devices())
    mesh = Mesh(devs, ("d",))
    rows = 2 * len(devs)
    w = jax.device_put(jnp.arange(rows * 3, dtype=jnp.float32).reshape(rows, 3) / 7 + step,
                       NamedSharding(mesh, P("d", None)))
    return {
        "w": w,  # sharded over every device: each shard is written by tensorstore
        "emb": (jnp.linspace(-3, 3, 10, dtype=jnp.float32) * step).astype(jnp.bfloat16),
        "opt": {"count": jnp.array(step, dtype=jnp.int32), "mu": jnp.full((4,), 0.1 * step, jnp.float32)},
    }


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_orbax_checkpoint_manager_roundtrip_on_gcs(gcs_dir):
    import jax
    import orbax.checkpoint as ocp

    ckdir = storage.as_path(f"{gcs_dir}/run/checkpoints")
    assert str(ckdir).startswith("gs://")
    saved = {s: _state(s) for s in (1, 2)}
    opts = ocp.CheckpointManagerOptions(max_to_keep=3, create=True)
    with ocp.CheckpointManager(ckdir, options=opts) as mgr:
        for s in (1, 2):
            mgr.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(saved[s]),
                                                meta=ocp.args.JsonSave({"step": s, "note": "gcs"})))
        mgr.wait_until_finished()

    keys = _objects(str(ckdir))
    for s in (1, 2):
        assert f"{s}/meta/metadata" in keys, keys
        assert any(k.startswith(f"{s}/state/") and "/d/" in k for k in keys), keys  # tensorstore's data

    with ocp.CheckpointManager(ckdir) as fresh:
        assert fresh.latest_step() == 2
        assert fresh.all_steps() == [1, 2]
        for s in (1, 2):
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved[s])
            got = fresh.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           meta=ocp.args.JsonRestore()))
            assert got["meta"] == {"step": s, "note": "gcs"}
            flat_got = jax.tree_util.tree_leaves_with_path(got["state"])
            flat_want = jax.tree_util.tree_leaves_with_path(saved[s])
            assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
            for (path, g), (_, w) in zip(flat_got, flat_want):
                assert _same(g, w), (s, jax.tree_util.keystr(path))
            assert got["state"]["w"].sharding.is_equivalent_to(saved[s]["w"].sharding, 2)


# ----------------------------------------------------------------------------- (b) text files
def test_append_line_on_gcs(gcs_dir):
    path = f"{gcs_dir}/metrics.jsonl"
    recs = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(3)]
    for r in recs:
        storage.append_line(path, json.dumps(r))
    assert _objects(gcs_dir) == ["metrics.jsonl"]
    lines = storage.as_path(path).read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs
    with pytest.raises(ValueError):
        storage.append_line(path, "two\nlines")


def test_append_line_local_appends(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    for i in range(3):
        storage.append_line(path, f'{{"step": {i}}}\n')
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'


def test_write_text_atomic_gcs_and_local(gcs_dir, tmp_path):
    for target in (f"{gcs_dir}/summary.json", tmp_path / "out" / "summary.json"):
        storage.write_text_atomic(target, '{"a": 1}')
        storage.write_text_atomic(target, '{"a": 2}')
        assert json.loads(storage.as_path(target).read_text()) == {"a": 2}
    assert _objects(gcs_dir) == ["summary.json"]
    assert sorted(os.listdir(tmp_path / "out")) == ["summary.json"]  # no temp file left behind


# ----------------------------------------------------------------------------- (c) directories
def _hf_dir(root: Path) -> dict[str, bytes]:
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32)},
              str(root / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": rng.standard_normal((16, 8)).astype(np.float16)},
              str(root / "model-00002-of-00002.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "extra").mkdir()
    (root / "extra" / "notes.bin").write_bytes(bytes(range(256)) * 3)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_copy_tree_and_download_tree_via_gcs(gcs_dir, tmp_path):
    want = _hf_dir(tmp_path / "export")
    dst = f"{gcs_dir}/hf"
    storage.write_text_atomic(f"{dst}/stale-from-older-export.safetensors", "old")
    storage.write_text_atomic(f"{dst}-sibling/not-mine.txt", "x")  # same key prefix, other dir

    out = storage.copy_tree(tmp_path / "export", dst)
    assert str(out) == dst
    assert _objects(dst) == sorted(want)  # every file uploaded, the stale object removed

    cache = tmp_path / "cache" / "hf"
    (cache).mkdir(parents=True)
    (cache / "leftover.txt").write_text("replaced")
    got_dir = storage.download_tree(dst, cache)
    assert got_dir == cache
    got = {p.relative_to(cache).as_posix(): p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert got == want
    assert sorted(os.listdir(cache.parent)) == ["hf"]  # no staging directory left behind

    with pytest.raises(FileNotFoundError):
        storage.download_tree(f"{gcs_dir}/nothing-here", tmp_path / "empty")


def test_copy_tree_local_replaces(tmp_path):
    want = _hf_dir(tmp_path / "export")
    dst = tmp_path / "published"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    storage.copy_tree(tmp_path / "export", dst)
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == want
    assert sorted(os.listdir(tmp_path)) == ["export", "published"]


# ----------------------------------------------------------------------------- (d) TensorBoard
def _scalars(event_file: bytes) -> list[tuple[str, int, float]]:
    """Parse a TFRecord event file (length, crc, Event proto, crc) with tensorboardX's proto."""
    from tensorboardX.proto.event_pb2 import Event

    out, i = [], 0
    while i < len(event_file):
        (n,) = struct.unpack("<Q", event_file[i:i + 8])
        ev = Event.FromString(event_file[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in ev.summary.value:
            out.append((v.tag, ev.step, v.simple_value))
    assert i == len(event_file), "truncated event file"
    return out


def test_summary_writer_on_gcs(gcs_dir):
    import fsspec

    logdir = f"{gcs_dir}/tb"
    w = storage.summary_writer(logdir)
    for step in range(3):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.flush()
    first = _objects(logdir)
    assert len(first) == 1 and first[0].startswith("events.out.tfevents."), first
    fs, _ = fsspec.core.url_to_fs(logdir)
    mid = _scalars(fs.cat_file(f"{logdir}/{first[0]}"))
    assert [s for _, s, _ in mid] == [0, 1, 2]  # visible on the bucket after flush(), before close()

    w.add_scalar("train/lr", 3e-4, 3)
    w.close()
    assert _objects(logdir) == first
    data = fs.cat_file(f"{logdir}/{first[0]}")
    assert b"train/loss" in data and b"train/lr" in data
    got = _scalars(data)
    assert [(t, s) for t, s, _ in got] == [("train/loss", 0), ("train/loss", 1), ("train/loss", 2), ("train/lr", 3)]
    np.testing.assert_allclose([v for *_, v in got], [1.0, 0.5, 1 / 3, 3e-4], rtol=1e-6)


def test_summary_writer_local(tmp_path):
    w = storage.summary_writer(tmp_path / "tb")
    w.add_scalar("x", 2.0, 7)
    w.close()
    (f,) = list((tmp_path / "tb").iterdir())
    assert _scalars(f.read_bytes()) == [("x", 7, 2.0)]


# ----------------------------------------------------------------------------- (e) paths
def test_as_path_keeps_gs_and_makes_local_absolute(tmp_path):
    p = storage.as_path("gs://bucket/run/ckpt")
    assert str(p) == "gs://bucket/run/ckpt"
    assert str(p / "tb") == "gs://bucket/run/ckpt/tb"
    assert storage.is_remote(p) and storage.is_remote("gs://bucket")
    assert str(storage.as_path(Path("gs://bucket/run"))) == "gs://bucket/run"  # pathlib's "gs:/bucket/run"
    assert str(storage.as_path("gs://bucket/run/")) == "gs://bucket/run"

    rel = storage.as_path("runs/exp1")
    assert rel.is_absolute() and str(rel) == str(tmp_path / "runs" / "exp1")  # cwd is tmp_path
    assert not storage.is_remote("runs/exp1") and not storage.is_remote(tmp_path)
    assert str(storage.as_path(tmp_path)) == str(tmp_path)


# ----------------------------------------------------------------------------- slayer train on gs://
@pytest.mark.slow
def test_slayer_train_with_a_gs_workdir_resumes_and_exports(gcs_dir, tmp_path, monkeypatch):
    """`slayer train` with workdir, export and model on gs://: stop after 4 of 6 steps, rerun to 6;
    the losses and the exported weights equal an uninterrupted local run's bit for bit, the metrics
    log on the bucket has every step, TensorBoard events are there, and the export loads from gs://."""
    import shutil
    import subprocess
    import sys

    from safetensors.numpy import load_file
    from tiny_tok import make_exported_model

    from slayer_jax.io import load_any
    from slayer_jax.io.hf import save_hf

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("SLAYER_CACHE", str(tmp_path / "cache"))
    model = make_exported_model(tmp_path / "model", layers=3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py"))[:4]:
        shutil.copy(p, corpus / p.name)
    params, cfg, tok = load_any(model)
    save_hf(params, cfg, f"{gcs_dir}/base", tokenizer=tok, progress=False)  # the model, read back from gs://

    def train(model_src, workdir, export):
        o = {"model": model_src, "workdir": workdir, "export_dir": export, "steps": 6, "batch_size": 4,
             "data.source": corpus, "data.seq_len": 32, "plan.expand": 1, "log_every": 1, "eval_every": 1000,
             "checkpoint.every": 2, "checkpoint.keep": 2, "num_devices": 1}
        args = [sys.executable, "-m", "slayer_jax.cli", "train", "--config", str(repo / "configs" / "smollm2_slayer.py"),
                *[f"--config.{k}={v}" for k, v in o.items()]]
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
        r = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        return r.returncode, r.stdout + r.stderr

    code, out = train(model, tmp_path / "local", tmp_path / "local" / "hf")
    assert code == 0, out[-3000:]
    ref = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]

    remote = f"{gcs_dir}/run"
    code, out = train(f"{gcs_dir}/base", remote, f"{remote}/hf")
    assert code == 0, out[-3000:]
    assert "(no checkpoint: starting at step 0)" in out
    # as if the run had stopped after step 4's checkpoint: drop step 6's, rerun on the same gs:// workdir
    import fsspec

    fs, root = fsspec.core.url_to_fs(remote)
    fs.invalidate_cache()
    fs.rm(f"{root}/checkpoints/6", recursive=True)
    code, out = train(f"{gcs_dir}/base", remote, f"{remote}/hf")
    assert code == 0, out[-3000:]
    assert "has a checkpoint at step 4: resuming from it" in out and "resumed from step 4" in out

    got = {}
    for line in storage.as_path(f"{remote}/metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        got[r["step"]] = r
    assert sorted(got) == list(range(1, 7))
    for r in ref:
        assert got[r["step"]]["loss"] == r["loss"] and got[r["step"]]["grad_norm"] == r["grad_norm"], r["step"]
    keys = _objects(remote)
    assert any(k.startswith("tb/") and "tfevents" in k for k in keys), keys
    assert "hf/model.safetensors" in keys and any(k.startswith("checkpoints/6/state/") for k in keys), keys
    exported, _, _ = load_any(f"{remote}/hf")
    local = load_file(str(tmp_path / "local" / "hf" / "model.safetensors"))
    remote_file = load_file(str(tmp_path / "cache" / "remote" / remote.split("://")[1] / "hf" / "model.safetensors"))
    assert sorted(local) == sorted(remote_file)
    for k in local:
        assert np.array_equal(local[k], remote_file[k]), k
    assert len(exported["layers"]) == 4


# ----------------------------------------------------------------------------- prepared corpora on gs://
def test_prepared_corpus_written_to_and_read_from_gs(gcs_dir, tmp_path, monkeypatch):
    """`slayer data prepare --out gs://...` uploads the same files a local prepare writes, and a
    gs:// data.source reads the same rows (fetched once into the cache)."""
    from tiny_tok import corpus, make_tokenizer

    from slayer_jax.data import prepare as P

    monkeypatch.setenv("SLAYER_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus() * 3))
    tok = make_tokenizer()
    local = P.prepare_corpus(src, tok, tmp_path / "local", seq_len=48, shards=2)
    remote = P.prepare_corpus(src, tok, f"{gcs_dir}/prep", seq_len=48, shards=2)
    assert remote["counts"] == local["counts"] and remote["fingerprint"] == local["fingerprint"]
    assert _objects(f"{gcs_dir}/prep") == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert P.is_prepared(f"{gcs_dir}/prep") and not P.is_prepared(f"{gcs_dir}/nothing")
    a, b = P.PreparedCorpus(tmp_path / "local"), P.PreparedCorpus(f"{gcs_dir}/prep")
    assert len(a) == len(b) > 4
    ra, rb = a.read(range(len(a))), b.read(range(len(b)))
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    with pytest.raises(Exception, match="already exists"):
        P.prepare_corpus(src, tok, f"{gcs_dir}/prep", seq_len=48)


def test_convert_to_a_gs_checkpoint_and_export_from_it(gcs_dir, tmp_path, monkeypatch):
    """`slayer convert --to checkpoint --out gs://...`, then `slayer export gs://... DIR`: the same
    weights as a local round trip; an existing gs:// output is refused without --overwrite."""
    from safetensors.numpy import load_file
    from tiny_tok import make_exported_model

    from slayer_jax.cli import main

    monkeypatch.setenv("SLAYER_CACHE", str(tmp_path / "cache"))
    model = make_exported_model(tmp_path / "model", layers=2)
    assert main(["convert", str(model), f"{gcs_dir}/ckpt", "--to", "checkpoint"]) == 0
    assert "ckpt/config.json" in [f"ckpt/{k}" for k in _objects(f"{gcs_dir}/ckpt")]
    assert main(["export", f"{gcs_dir}/ckpt", str(tmp_path / "back")]) == 0
    a, b = load_file(str(model / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["convert", str(model), f"{gcs_dir}/ckpt", "--to", "checkpoint"]) == 2


def test_a_raw_gs_corpus_tokenises_like_the_local_file(gcs_dir, tmp_path, monkeypatch):
    from tiny_tok import corpus, make_tokenizer

    from slayer_jax.data import make_dataset

    monkeypatch.setenv("SLAYER_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus()))
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{gcs_dir}/corpus.jsonl")
    fs.put(str(src), root)
    tok = make_tokenizer()
    a, b = make_dataset(src, tok, 48), make_dataset(f"{gcs_dir}/corpus.jsonl", tok, 48)
    assert a.stats == b.stats and a.fingerprint() == b.fingerprint()
    src.write_text(src.read_text() + json.dumps({"text": "one more document"}) + "\n")
    fs.put(str(src), root)  # a changed object is fetched again
    assert make_dataset(f"{gcs_dir}/corpus.jsonl", tok, 48).stats.documents == a.stats.documents + 1
