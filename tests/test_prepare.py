"""`slayer data prepare` and the prepared-corpus loader: round trip against the in-memory tokenisation,
atomic writes, one-line CLI errors, identical global batches for 1 and 2 processes, exact resume,
mixtures in proportion to their weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from slayer_jax import data as D
from slayer_jax.cli import main
from slayer_jax.data import prepare as P
from slayer_jax.data.training_data import open_training_data
from slayer_jax.errors import SlayerError

sys.path.insert(0, str(Path(__file__).parent))
from test_data import CHAT, CHATML
from tiny_tok import make_tokenizer

T = 64
WORDS_A = "the fox jumps over lazy dog question answer hello world".split()
WORDS_B = "def return if else import print 0 1 2 3 4 5 6 7 8 9".split()


def write_corpus(path: Path, words, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 70)))}) for _ in range(n)]
    lines.insert(n // 2, json.dumps({"text": "   "}))  # an empty document: skipped and counted
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    tok = make_tokenizer()
    tok.chat_template = CHATML
    tok.save_pretrained(str(d / "tok"))
    a = write_corpus(d / "a.jsonl", WORDS_A, 160, 0)
    b = write_corpus(d / "b.jsonl", WORDS_B, 160, 1)
    for src, out in ((a, "A"), (b, "B")):
        assert main(["data", "prepare", str(src), "--tokenizer", str(d / "tok"), "--out", str(d / out),
                     "--seq-len", str(T), "--shards", "3", "--quiet"]) == 0
    return {"dir": d, "tok": tok, "a": a, "b": b, "A": d / "A", "B": d / "B"}


def key(inputs) -> tuple:
    return tuple(np.asarray(inputs).tolist())


def all_rows(pc) -> list[tuple]:
    return [key(r) for r in pc.read(range(len(pc)))["inputs"]]


# ----------------------------------------------------------------------------- prepare
def test_round_trip_matches_in_memory_tokenisation(env):
    docs = D.make_dataset(env["a"], env["tok"], T)
    pc = P.PreparedCorpus(env["A"])
    m = pc.manifest
    want = Counter(key(p) for p in docs.pieces)
    got = Counter(key(t) for t, mask in pc.pieces())
    assert got == want and sum(got.values()) == len(docs) > 160            # every piece once, nothing else
    c = m["counts"]
    assert (c["documents"], c["pieces"], c["tokens"], c["loss_tokens"], c["empty"], c["split"], c["chunks"]) == \
        (docs.stats.documents, len(docs), docs.stats.tokens, docs.stats.loss_tokens, 1, docs.stats.split,
         docs.stats.chunks)
    assert c["empty"] == 1 and c["split"] > 0
    assert sum(s["records"] for s in m["shards"]) == c["rows"] == len(pc)
    assert [s["file"] for s in m["shards"]] == [f"rows-0000{i}-of-00003.array_record" for i in range(3)]
    assert sorted(os.listdir(env["A"])) == sorted(["manifest.json"] + [s["file"] for s in m["shards"]])
    assert m["tokenizer"]["vocab_size"] == len(env["tok"]) and m["seq_len"] == T and m["mode"] == "text"
    assert m["separator_id"] == D.separator_id(env["tok"], "auto") and m["token_dtype"] == "uint16"
    assert m["provenance"]["files"][0]["bytes"] == env["a"].stat().st_size and m["provenance"]["slayer_version"]
    rows = pc.read(range(len(pc)))
    assert int(rows["weights"].sum()) == c["loss_tokens"] and int((rows["segment_ids"] > 0).sum()) == c["tokens"]
    # rows equal packed_row of grain's packer rows, through the codec (text and SFT masks)
    rng = np.random.default_rng(0)
    toks = [rng.integers(1, 500, rng.integers(1, 40)) for _ in range(40)]
    masks = [rng.integers(0, 2, t.size) for t in toks]
    for lm in (None, masks):
        small = D.Documents.from_token_lists(toks, 48, loss_masks=lm)
        raw = list(D.pipeline._packed_rows(small, order=D.grain_range(len(small)), seed=0, shuffle_bins=False,
                                  packing_bins=4)._parent)  # the packer's own rows
        recs = [P.encode_packed(r, False, lm is not None) for r in raw]
        ref = [D.packed_row(r) for r in raw]
        dec = P.rows_from_records(recs, 48)
        for k in D.ARRAY_KEYS:
            np.testing.assert_array_equal(dec[k], np.stack([r[k] for r in ref]))
            assert dec[k].dtype == ref[0][k].dtype


def test_sft_prepare_keeps_masks(env, tmp_path):
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [CHAT, CHAT[1:3]]))
    P.prepare_corpus(p, env["tok"], tmp_path / "S", seq_len=128, mode="sft")
    docs = D.make_dataset(p, env["tok"], 128, mode="sft")
    pc = P.PreparedCorpus(tmp_path / "S")
    got = sorted((key(t), key(m)) for t, m in pc.pieces())
    assert got == sorted((key(t), key(m)) for t, m in zip(docs.pieces, docs.masks))
    assert pc.manifest["counts"]["loss_tokens"] == docs.stats.loss_tokens == int(pc.read(range(len(pc)))["weights"].sum())


def test_prepare_is_atomic(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = env["a"].read_text().splitlines()
    bad.write_text("\n".join(lines[:100] + ['{"text": 5}'] + lines[100:]) + "\n")   # fails mid-stream
    out = tmp_path / "out"
    with pytest.raises(SlayerError, match=r"bad.jsonl: line 101: field 'text' is a int"):
        P.prepare_corpus(bad, env["tok"], out, seq_len=T, shards=2)
    assert os.listdir(tmp_path) == ["bad.jsonl"]                                   # no output, no temporary dir
    P.prepare_corpus(env["b"], env["tok"], out, seq_len=T)
    before = (out / "manifest.json").read_text()
    with pytest.raises(SlayerError):
        P.prepare_corpus(bad, env["tok"], out, seq_len=T, overwrite=True)
    assert (out / "manifest.json").read_text() == before and sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out"]


def test_iter_documents_streams(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    it = D.iter_documents(tmp_path)
    assert next(it) == "first document"                   # yielded before the next file is read
    with pytest.raises(SlayerError, match="b.txt: byte 0 is not UTF-8"):
        next(it)


@pytest.mark.parametrize("case", ["missing", "bad_json", "no_field", "seq_len", "shards", "no_tokenizer",
                                  "exists", "separator"])
def test_cli_bad_input_is_one_line(env, tmp_path, capsys, case):
    d = env["dir"]
    src, tok, extra = str(env["a"]), str(d / "tok"), []
    if case == "missing":
        src, want = str(tmp_path / "nope.jsonl"), "nope.jsonl: no such file or directory"
    elif case == "bad_json":
        (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n')
        src, want = str(tmp_path / "x.jsonl"), "x.jsonl: line 2: not valid JSON"
    elif case == "no_field":
        (tmp_path / "x.jsonl").write_text('{"body": "ok"}\n')
        src, want = str(tmp_path / "x.jsonl"), "x.jsonl: line 1: no field 'text' (fields: body)"
    elif case == "seq_len":
        extra, want = ["--seq-len", "1"], "--seq-len: 1; expected an integer > 1"
    elif case == "shards":
        extra, want = ["--shards", "0"], "--shards: 0; expected a positive integer"
    elif case == "no_tokenizer":
        (tmp_path / "empty").mkdir()
        tok, want = str(tmp_path / "empty"), "no tokenizer files"
    elif case == "exists":
        (tmp_path / "out").mkdir()
        want = "already exists; pass --overwrite"
    else:
        extra, want = ["--separator", "<|nope|>"], "data.separator: token '<|nope|>' is not in the tokenizer's vocab"
    argv = ["data", "prepare", src, "--tokenizer", tok, "--out", str(tmp_path / "out"), "--seq-len", str(T),
            "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slayer: error: ") and err.count("\n") == 1 and want in err, err
    assert "Traceback" not in err
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_cli_exit_code_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slayer_jax.cli", "data", "prepare", str(tmp_path / "none.jsonl"),
                        "--tokenizer", "default", "--out", str(tmp_path / "o"), "--seq-len", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- loader
def take(it, n):
    return [next(it) for _ in range(n)]


def concat(per_process):
    return {k: np.concatenate([b[k] for b in per_process]) for k in D.ARRAY_KEYS}


def test_two_processes_read_the_one_process_global_batches(env):
    pc = P.PreparedCorpus(env["A"])
    n, B = len(pc), 8
    steps = -(-2 * n // B) + 1                                   # more than two epochs
    one = take(D.make_loader(pc, batch_size=B, seed=3, shard_index=0, shard_count=1), steps)
    two = [D.make_loader(P.PreparedCorpus(env["A"]), batch_size=B // 2, seed=3, shard_index=p, shard_count=2)
           for p in range(2)]
    for g in range(steps):
        parts = [next(it) for it in two]
        assert all(p["inputs"].shape == (B // 2, T) for p in parts)
        both = concat(parts)
        for k in D.ARRAY_KEYS:
            np.testing.assert_array_equal(both[k], one[g][k])
    seq = [key(r) for b in one for r in b["inputs"]]
    everything = Counter(all_rows(pc))
    assert Counter(seq[:n]) == everything and Counter(seq[n:2 * n]) == everything    # each row once per epoch
    assert seq[:n] != seq[n:2 * n]                                                    # reshuffled every epoch
    assert seq[:n] != all_rows(pc)                                                    # shuffled at all
    # what train.py's multihost path asks for: this process's contiguous rows of the global batch
    mine = take(D.make_loader(pc, batch_size=B, seed=3, shard_index=0, shard_count=1, local_rows=slice(2, 7)), 3)
    for g in range(3):
        np.testing.assert_array_equal(mine[g]["inputs"], one[g]["inputs"][2:7])
    other = take(D.make_loader(pc, batch_size=B, seed=4, shard_index=0, shard_count=1), 2)
    assert not np.array_equal(other[0]["inputs"], one[0]["inputs"])


def test_prepared_loader_resumes_exactly(env):
    pc = P.PreparedCorpus(env["A"])
    kw = dict(batch_size=4, seed=5, shard_index=1, shard_count=2, prefetch=2)
    ref = take(D.make_loader(pc, **kw), 60)                      # crosses epoch boundaries (~85 rows / 8)
    for k in (0, 7, 33):
        it = D.make_loader(pc, **kw)
        take(it, k)
        state = json.loads(json.dumps(D.get_state(it)))
        fresh = D.make_loader(P.PreparedCorpus(env["A"]), **kw)
        D.set_state(fresh, state)
        for a, b in zip(take(fresh, 60 - k), ref[k:]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
    # the state is a global batch index: a 1-process run resumes on 2 processes with the same global batch
    it1 = D.make_loader(pc, batch_size=8, seed=5, shard_index=0, shard_count=1)
    take(it1, 11)
    state = D.get_state(it1)
    two = [D.make_loader(pc, batch_size=4, seed=5, shard_index=p, shard_count=2) for p in range(2)]
    for it in two:
        D.set_state(it, state)
    for _ in range(3):
        np.testing.assert_array_equal(concat([next(it) for it in two])["inputs"], next(it1)["inputs"])
    with pytest.raises(SlayerError, match="'seed' was 5 when saved, now 6"):
        D.set_state(D.make_loader(pc, batch_size=8, seed=6, shard_index=0, shard_count=1), state)


def test_mixture_proportions_and_resume(env):
    a, b = P.PreparedCorpus(env["A"]), P.PreparedCorpus(env["B"])
    rows_a = set(all_rows(a))
    mix = D.Mixture([a, b], [1.0, 1.5])
    B, steps = 10, 80
    one = take(D.make_loader(mix, batch_size=B, seed=2, shard_index=0, shard_count=1), steps)
    seq = [key(r) for x in one for r in x["inputs"]]
    N, p = len(seq), 1.0 / 2.5
    n_a = sum(r in rows_a for r in seq)
    # Binomial(N, p) noise would be sd = sqrt(N p (1-p)) ~ 13.9 rows for N = 800; grain's MapDataset.mix
    # interleaves deterministically, so the realised count is within a row or two of N p. Allow 3 sd.
    assert abs(n_a - N * p) <= 3 * np.sqrt(N * p * (1 - p)), (n_a, N * p)
    assert abs(n_a - N * p) <= 2                                           # the deterministic interleave
    # each component covers its rows once per its own epoch
    seq_a = [r for r in seq if r in rows_a]
    assert len(seq_a) >= len(a) and Counter(seq_a[:len(a)]) == Counter(all_rows(a))
    # 2 processes = 1 process, and exact resume
    two = [D.make_loader(D.Mixture([a, b], [1.0, 1.5]), batch_size=B // 2, seed=2, shard_index=q, shard_count=2)
           for q in range(2)]
    for g in range(5):
        np.testing.assert_array_equal(concat([next(it) for it in two])["inputs"], one[g]["inputs"])
    it = D.make_loader(mix, batch_size=B, seed=2, shard_index=0, shard_count=1)
    take(it, 17)
    fresh = D.make_loader(D.Mixture([a, b], [1.0, 1.5]), batch_size=B, seed=2, shard_index=0, shard_count=1)
    D.set_state(fresh, D.get_state(it))
    for x, y in zip(take(fresh, 10), one[17:27]):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    with pytest.raises(SlayerError, match="'weights'"):
        D.set_state(D.make_loader(D.Mixture([a, b], [1.0, 2.0]), batch_size=B, seed=2, shard_index=0,
                                  shard_count=1), D.get_state(it))


def test_in_memory_mixture_proportions_and_resume(env):
    da = D.make_dataset(env["a"], env["tok"], T)
    db = D.make_dataset(env["b"], env["tok"], T)
    ids_a = {int(t) for p in da.pieces for t in p} - {int(t) for p in db.pieces for t in p}
    kw = dict(batch_size=8, seed=1, shard_index=0, shard_count=1)
    it = D.make_loader(D.Mixture([da, db], [1.0, 1.5]), **kw)
    ref = take(it, 30)
    rows = [r for x in ref for r in x["inputs"]]
    n_a = sum(bool(ids_a & set(r.tolist())) for r in rows)
    N, p = len(rows), 0.4
    assert abs(n_a - N * p) <= 3 * np.sqrt(N * p * (1 - p)), (n_a, N * p)     # rows of A (A's own tokens)
    it = D.make_loader(D.Mixture([da, db], [1.0, 1.5]), **kw)
    take(it, 9)
    fresh = D.make_loader(D.Mixture([da, db], [1.0, 1.5]), **kw)
    D.set_state(fresh, D.get_state(it))
    for x, y in zip(take(fresh, 5), ref[9:14]):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


# ----------------------------------------------------------------------------- training entry point
def cdata(source, **kw):
    c = ml_collections.ConfigDict({"source": str(source), "mode": "text", "field": "", "seq_len": T,
                                   "separator": "auto", "packing_bins": 0})
    c.update(kw)
    return c


def test_open_training_data(env):
    tok = env["tok"]
    loader, info = open_training_data(cdata(f"{env['A']}@1.0;{env['B']}@1.5"), tok, seed=0, batch_size=4,
                                      process_index=0, process_count=2)
    ma, mb = P.read_manifest(env["A"]), P.read_manifest(env["B"])
    assert info.kind == "prepared" and info.rows_per_epoch == ma["counts"]["rows"] + mb["counts"]["rows"]
    assert info.stats.tokens == ma["counts"]["tokens"] + mb["counts"]["tokens"] and info.stats.seq_len == T
    assert info.separator == ma["separator_id"] and [c["weight"] for c in info.components] == [1.0, 1.5]
    assert next(loader)["inputs"].shape == (4, T)
    assert info.steps(epochs=2, steps=7, global_batch=8) == -(-2 * info.rows_per_epoch // 8)
    _, raw = open_training_data(cdata(env["a"]), tok, seed=0, batch_size=4, process_index=0, process_count=1,
                                count_rows=True)
    assert raw.kind == "in-memory" and raw.rows_per_epoch > 0 and raw.stats.tokens == ma["counts"]["tokens"]
    for c, want in ((cdata(env["A"], seq_len=32), "field 'seq_len' is 64; data.seq_len is 32"),
                    (cdata(env["A"], separator="none"), "field 'separator_id' is"),
                    (cdata(f"{env['A']};{env['a']}"), "is not a prepared directory but other components are"),
                    (cdata(f"{env['A']}@0"), "positive weight")):
        with pytest.raises(SlayerError, match=want.replace("(", r"\(").replace(")", r"\)")) as ei:
            open_training_data(c, tok, seed=0, batch_size=4, process_index=0, process_count=1)
        assert "\n" not in str(ei.value)
