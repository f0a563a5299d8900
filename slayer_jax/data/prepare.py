"""``slayer data prepare``: tokenise and pack a corpus once into sharded ArrayRecord files, and the
random-access row source training streams from them (:class:`PreparedCorpus`).

Why packed rows, not document pieces
------------------------------------
A multi-process run must read the same global batches whatever the number of processes, each
packed row exactly once per epoch. If every process packed its own share of documents (what the
in-memory loader does), the rows would depend on the process count. So the packing happens here,
once, and training shards *rows*: global batch g of the epoch is rows ``perm[g*B:(g+1)*B]`` of a
seeded per-epoch permutation, and process p reads its slice ``[p*b:(p+1)*b]`` of it
(:func:`slayer_jax.data.make_loader`). The union over processes of a global batch is the 1-process
global batch, by construction, and the loader state (a global batch index) is the same on every
process.

Trade-off: documents are shuffled once (seeded, before packing), so neighbouring documents of the
source never share rows; but the documents that share a row are the same in every epoch (the rows
themselves are reshuffled every epoch). At the paper's scale (~1 epoch of 67-80B tokens) this is
immaterial; for many epochs over a small corpus, the in-memory path (a raw ``data.source``)
repacks a new document order every epoch.

Steps: (1) stream the source through :func:`slayer_jax.data.iter_pieces` (the same tokenisation as
:func:`slayer_jax.data.make_dataset`) into temporary piece shards; (2) read the pieces back in a
seeded random order (random access, nothing held in memory) through grain's best-fit packer and
write the rows round-robin into ``--shards`` ArrayRecord files; (3) write ``manifest.json``, drop
the pieces, rename the temporary directory onto ``--out``. A failure leaves no output directory.

Layout of DIR::

    manifest.json                         # counts, tokenizer, settings, shards, provenance
    rows-00000-of-00004.array_record      # one record per packed row (ROW CODEC below)
    ...

Row codec (little-endian, no pickle): a 16-byte header ``b"SLR1", u8 dtype (0 = uint16, 1 = int32),
u8 has_mask, u16 0, u32 n_tokens, u32 n_segments``, then the row's tokens (``n_tokens`` of the
dtype; padding is not stored), the segment lengths (``n_segments`` uint32; segments are laid out
in order from position 0), and for SFT the loss mask of the tokens as ``np.packbits`` bits.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from slayer_jax import __version__, storage
from slayer_jax.data import pipeline
from slayer_jax.data.pipeline import PackStats
from slayer_jax.data.tokens import separator_id
from slayer_jax.errors import SlayerError, first_line
from slayer_jax.io import load_any
from slayer_jax.io.assets import _sha256  # one file hash for the project
from slayer_jax.io.hf import load_tokenizer
from slayer_jax.storage import staging_path

FORMAT = "slayer-prepared-rows"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAGIC = b"SLR1"
_HEADER = struct.Struct("<4sBBHII")
_DTYPES = (np.dtype("<u2"), np.dtype("<i4"))
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


# ============================================================================ codec
def encode_record(tokens: np.ndarray, seg_lens: Sequence[int], mask: np.ndarray | None, wide: bool) -> bytes:
    """One row (or one piece: a single segment) as bytes; see the module docstring."""
    tokens = np.asarray(tokens)
    dt = _DTYPES[int(wide)]
    lens = np.asarray(seg_lens, "<u4")
    head = _HEADER.pack(_MAGIC, int(wide), mask is not None, 0, tokens.size, lens.size)
    parts = [head, tokens.astype(dt, copy=False).tobytes(), lens.tobytes()]
    if mask is not None:
        parts.append(np.packbits(np.asarray(mask, bool)).tobytes())
    return b"".join(parts)


def decode_record(rec: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(tokens int32 [n], segment lengths int64 [k], mask int8 [n] or None = all ones)``."""
    if len(rec) < _HEADER.size:
        raise SlayerError(f"prepared record: {len(rec)} bytes; expected at least a {_HEADER.size}-byte header")
    magic, wide, has_mask, _, n, k = _HEADER.unpack_from(rec)
    if magic != _MAGIC or wide > 1:
        raise SlayerError(f"prepared record: header {rec[:6]!r}; expected a {_MAGIC!r} row record")
    dt = _DTYPES[wide]
    off = _HEADER.size
    toks = np.frombuffer(rec, dt, n, off).astype(np.int32)
    off += n * dt.itemsize
    lens = np.frombuffer(rec, "<u4", k, off).astype(np.int64)
    off += 4 * k
    mask = None
    if has_mask:
        mask = np.unpackbits(np.frombuffer(rec, np.uint8, (n + 7) // 8, off), count=n).astype(np.int8)
    return toks, lens, mask


def encode_packed(raw: dict[str, np.ndarray], wide: bool, sft: bool) -> bytes:
    """A row of grain's packer (``inputs``, ``mask``, ``inputs_segment_ids``, ...) as a record."""
    seg = np.asarray(raw["inputs_segment_ids"])
    n = int((seg > 0).sum())
    if n and (seg[n:] != 0).any():
        raise SlayerError("packer row: padding inside the row; expected segments laid out from position 0")
    cuts = np.flatnonzero(np.r_[True, seg[1:n] != seg[:n - 1], True]) if n else np.zeros(1, np.int64)
    lens = np.diff(cuts)
    return encode_record(np.asarray(raw["inputs"])[:n], lens, np.asarray(raw["mask"])[:n] if sft else None, wide)


def rows_from_records(records: Sequence[bytes], seq_len: int) -> dict[str, np.ndarray]:
    """Records -> ``{key: [len(records), seq_len]}`` of :data:`slayer_jax.data.ARRAY_KEYS`, equal to
    :func:`slayer_jax.data.packed_row` of the packer rows they were written from."""
    b, T = len(records), int(seq_len)
    inputs = np.zeros((b, T), np.int32)
    seg = np.zeros((b, T), np.int32)
    pos = np.zeros((b, T), np.int32)
    mask = np.zeros((b, T), np.int8)
    for r, rec in enumerate(records):
        toks, lens, m = decode_record(rec)
        n = toks.size
        if n > T or int(lens.sum()) != n:
            raise SlayerError(f"prepared record: {n} tokens in segments of {lens.tolist()}; expected at most "
                              f"seq_len {T} tokens, the segment lengths summing to them")
        inputs[r, :n] = toks
        seg[r, :n] = np.repeat(np.arange(1, lens.size + 1, dtype=np.int32), lens)
        pos[r, :n] = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
        mask[r, :n] = 1 if m is None else m
    same = np.zeros((b, T), bool)
    same[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    weights = np.zeros((b, T), np.float32)
    weights[:, :-1] = mask[:, 1:]
    return {"inputs": inputs, "targets": np.where(same, targets, 0), "positions": pos, "segment_ids": seg,
            "weights": np.where(same, weights, 0).astype(np.float32)}


# ============================================================================ tokenizer, provenance
def load_tokenizer_arg(name: str):
    """The tokenizer of a model argument as training takes it: an HF dir or slayer checkpoint with
    tokenizer files, ``default``, or (slowly: it loads the weights) anything ``load_any`` reads."""

    src = str(name)
    if src == "default":
        from slayer_jax.io.assets import default_model_dir

        src = str(default_model_dir())
    path = Path(src).expanduser()
    if path.is_dir():
        tok = load_tokenizer(path)
        if tok is None:
            raise SlayerError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json); "
                              f"expected a model directory with its tokenizer")
        return tok

    _, _, tok = load_any(src)
    if tok is None:
        raise SlayerError(f"{src}: no tokenizer; expected a model with tokenizer files")
    return tok


def vocab_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), to match a corpus to a model."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def provenance(source: str, *, split: str, sha256: bool = False, max_files: int = 100_000) -> dict:
    """Where the corpus came from: the input files' sizes and mtimes (and sha256 when asked), or
    the datasets name and split."""
    p = Path(str(source)).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        return {"source": str(source), "dataset": str(source), "split": split}
    out = []
    for f in files[:max_files]:
        st = f.stat()
        e = {"path": str(f.relative_to(p)) if p.is_dir() else f.name, "bytes": st.st_size,
             "mtime": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat()}
        if sha256:
            e["sha256"] = _sha256(f)
        out.append(e)
    d = {"source": str(p.absolute()), "split": split, "files": out, "total_bytes": sum(e["bytes"] for e in out)}
    if len(files) > max_files:
        d["files_left_out"] = len(files) - max_files
    return d


# ============================================================================ prepare
def _shard_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{n:05d}.array_record" for i in range(n)]


class _Writers:
    """Round-robin ArrayRecord writers: record r goes to shard r % n."""

    def __init__(self, paths: list[Path]):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.paths = paths
        self.writers = [ArrayRecordWriter(str(p), WRITER_OPTIONS) for p in paths]
        self.counts = [0] * len(paths)
        self.n = 0

    def write(self, rec: bytes) -> None:
        i = self.n % len(self.writers)
        self.writers[i].write(rec)
        self.counts[i] += 1
        self.n += 1

    def close(self) -> None:
        for w in self.writers:
            w.close()


def prepare_corpus(source: str | os.PathLike, tokenizer, out: str | os.PathLike, *, seq_len: int,
                   mode: str = "text", field: str | None = None, split: str = "train",
                   separator: str | int | None = "auto", add_bos: bool | None = None, long_docs: str | None = None,
                   shards: int = 1, packing_bins: int = 64, seed: int = 0, shuffle: bool = True,
                   tokenizer_name: str = "", sha256: bool = False, overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Tokenise ``source`` (any form :func:`slayer_jax.data.make_dataset` takes) once, pack it, and
    write ``out`` (module docstring); returns the manifest. Memory: one tokeniser batch, the
    packer's open rows and the shuffle's index, never the corpus."""

    if storage.is_remote(out):  # gs://: written locally, then uploaded (array_record writes local files)
        import tempfile

        remote = storage.as_path(out)
        if remote.exists() and not overwrite:
            raise SlayerError(f"{remote}: already exists; pass --overwrite to replace it")
        probe = remote / f".write-check-{os.getpid()}"
        try:  # a wrong bucket or missing permission fails now, not after hours of tokenising
            probe.write_text("ok")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 -- any storage error, as one line
            raise SlayerError(f"{remote}: cannot write there ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
        args = dict(seq_len=seq_len, mode=mode, field=field, split=split, separator=separator, add_bos=add_bos,
                    long_docs=long_docs, shards=shards, packing_bins=packing_bins, seed=seed, shuffle=shuffle,
                    tokenizer_name=tokenizer_name, sha256=sha256, progress=progress)
        with tempfile.TemporaryDirectory(prefix="slayer_prepare_") as staging:  # $TMPDIR chooses the disk
            manifest = prepare_corpus(source, tokenizer, Path(staging) / "out", **args)
            storage.copy_tree(Path(staging) / "out", out)
        return manifest
    if int(seq_len) < 2:
        raise SlayerError(f"--seq-len: {seq_len}; expected an integer > 1")
    if int(shards) < 1:
        raise SlayerError(f"--shards: {shards}; expected a positive integer")
    if int(packing_bins) < 1:
        raise SlayerError(f"--packing-bins: {packing_bins}; expected a positive integer")
    if mode not in ("text", "sft"):
        raise SlayerError(f"--mode: {mode!r}; expected text or sft")
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise SlayerError(f"{out}: already exists; pass --overwrite to replace it")
    T, n_shards = int(seq_len), int(shards)
    vocab = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    wide = vocab > 65536
    sep_id = None if mode == "sft" else separator_id(tokenizer, separator)  # a bad separator fails before any work
    tmp = staging_path(out)
    try:
        (tmp / "_pieces").mkdir(parents=True)
        # (1) the one tokenisation, streamed into piece shards
        stats = PackStats(seq_len=T)
        pw = _Writers([tmp / "_pieces" / n for n in _shard_names("pieces", n_shards)])
        try:
            for toks, mask in pipeline.iter_pieces(source, tokenizer, T, stats=stats, mode=mode, field=field, split=split,
                                            add_bos=add_bos, separator=separator, long_docs=long_docs,
                                            progress=progress):
                if not wide and toks.size and int(toks.max()) > 65535:
                    raise SlayerError(f"{source}: token id {int(toks.max())} >= 65536 but the tokenizer has "
                                      f"{vocab} tokens; expected ids below the vocabulary size")
                pw.write(encode_record(toks, [toks.size], mask, wide))
        finally:
            pw.close()
        n_pieces = pw.n
        if not n_pieces:
            raise SlayerError(f"{source}: no document piece to write; expected at least one kept document")
        # (2) pieces in a seeded random order -> grain's best-fit packer -> row shards
        src = grain.sources.ArrayRecordDataSource([str(p) for p in pw.paths])

        def element(i):
            toks, _, m = decode_record(src[int(i)])
            return {"inputs": toks, "mask": np.ones(toks.size, np.int8) if m is None else m}

        order = grain.MapDataset.range(n_pieces)
        if shuffle:
            order = order.shuffle(seed=pipeline._grain_seed(seed))
        packed = grain.experimental.BestFitPackIterDataset(
            order.map(element).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
            length_struct={"inputs": T, "mask": T}, num_packing_bins=int(packing_bins),
            seed=pipeline._grain_seed(seed), shuffle_bins=shuffle)
        names = _shard_names("rows", n_shards)
        rw = _Writers([tmp / n for n in names])
        digest = hashlib.sha256(f"{FORMAT}/{T}/{mode}".encode())
        try:
            for raw in packed:
                rec = encode_packed(raw, wide, mode == "sft")
                digest.update(hashlib.sha256(rec).digest())
                rw.write(rec)
        finally:
            rw.close()

        shutil.rmtree(tmp / "_pieces")
        stats.rows = rw.n
        stats.padding = rw.n * T - stats.tokens
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "seq_len": T, "mode": mode, "field": field or ("text" if mode == "text" else "messages"), "split": split,
            "separator": None if separator is None else str(separator), "separator_id": sep_id,
            "add_bos": add_bos, "long_docs": long_docs or ("split" if mode == "text" else "drop"),
            "tokenizer": {"name": str(tokenizer_name or getattr(tokenizer, "name_or_path", "")),
                          "name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": vocab,
                          "vocab_hash": vocab_hash(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id},
            "token_dtype": str(_DTYPES[int(wide)].name),
            "packing": {"packer": "grain.experimental.BestFitPackIterDataset", "packing_bins": int(packing_bins),
                        "seed": int(seed), "document_shuffle": "once, before packing" if shuffle else "none"},
            "counts": {"documents": stats.documents, "pieces": n_pieces, "tokens": stats.tokens,
                       "loss_tokens": stats.loss_tokens, "rows": stats.rows, "padding": stats.padding,
                       "fill": round(stats.fill, 6), "empty": stats.empty, "split": stats.split,
                       "chunks": stats.chunks, "dropped": stats.dropped, "dropped_tokens": stats.dropped_tokens,
                       "no_loss": stats.no_loss},
            "shards": [{"file": n, "records": c, "bytes": (tmp / n).stat().st_size} for n, c in zip(names, rw.counts)],
            "fingerprint": digest.hexdigest()[:16],
            "provenance": {**provenance(source, split=split, sha256=sha256), "slayer_version": __version__,
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():  # --overwrite: swap, then drop the old one
            old = staging_path(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ============================================================================ read
def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`prepare_corpus`."""
    try:
        from slayer_jax import storage

        if storage.is_remote(path):
            return (storage.as_path(path) / MANIFEST).exists()
        p = Path(str(path)).expanduser()
        return (p / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared corpus, every field the reader uses checked for its type."""
    p = Path(str(path)).expanduser() / MANIFEST
    try:
        m = json.loads(p.read_bytes())
    except OSError as e:
        raise SlayerError(f"{p}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise SlayerError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); expected a slayer data manifest") from None
    except (ValueError, RecursionError) as e:  # not UTF-8; a 4300-digit number; nesting too deep
        raise SlayerError(f"{p}: not valid JSON ({first_line(e)[:100]}); expected a slayer data manifest") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SlayerError(f"{p}: field 'format' is {m.get('format') if isinstance(m, dict) else m!r:.60}; "
                          f"expected {FORMAT!r} (written by `slayer data prepare`)")
    if m.get("format_version") != FORMAT_VERSION:
        raise SlayerError(f"{p}: field 'format_version' is {m.get('format_version')!r:.60}; expected {FORMAT_VERSION}")
    for key in ("seq_len", "mode", "counts", "shards", "fingerprint", "tokenizer"):
        if key not in m:
            raise SlayerError(f"{p}: no field '{key}'; expected a complete slayer data manifest")

    def bad(field: str, value: Any, expected: str):
        return SlayerError(f"{p}: field '{field}' is {value!r:.80}; expected {expected}")

    if not _count(m["seq_len"]) or m["seq_len"] < 2:
        raise bad("seq_len", m["seq_len"], "an integer of at least 2")
    if m["mode"] not in ("text", "sft"):
        raise bad("mode", m["mode"], "'text' or 'sft'")
    if not isinstance(m["fingerprint"], str):
        raise bad("fingerprint", m["fingerprint"], "a string")
    if m.get("separator_id") is not None and not _count(m["separator_id"]):
        raise bad("separator_id", m["separator_id"], "a token id or null")
    counts = m["counts"]
    if not isinstance(counts, dict) or not _count(counts.get("rows")):
        raise bad("counts", counts, "an object with an integer 'rows'")
    for k in {f.name for f in dataclasses.fields(PackStats)} & set(counts):
        if not _count(counts[k]):
            raise bad(f"counts.{k}", counts[k], "a non-negative integer")
    tok = m["tokenizer"]
    if not isinstance(tok, dict) or not _count(tok.get("vocab_size")) or \
            not isinstance(tok.get("vocab_hash"), (str, type(None))):
        raise bad("tokenizer", tok, "an object with an integer 'vocab_size' and a string 'vocab_hash'")
    shards = m["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("shards", shards, "a non-empty list of {file, records}")
    for n, sh in enumerate(shards):
        name = sh.get("file") if isinstance(sh, dict) else None
        if not (isinstance(name, str) and name and name == Path(name).name and name not in (".", "..")) \
                or not _count(sh.get("records")):
            raise bad(f"shards[{n}]", sh, "{\"file\": a file name inside the corpus folder, \"records\": an integer}")
    return m


class PreparedCorpus:
    """A prepared directory as a random-access source of packed rows: ``len`` rows, :meth:`read`
    of any row indices. Opens the shards with ``grain.sources.ArrayRecordDataSource``; reads
    nothing else until asked. :func:`slayer_jax.data.make_loader` streams it."""

    kind = "rows"

    def __init__(self, path: str | os.PathLike):


        # gs://: fetched once per host into the cache (array_record reads local files). For a corpus
        # larger than a host's disk, mount the bucket with gcsfuse and give the mount path instead.
        self.path = storage.cached_copy(str(path)) if storage.is_remote(path) else Path(str(path)).expanduser()
        self.manifest = m = read_manifest(self.path)
        self.seq_len = int(m["seq_len"])
        self.mode = m["mode"]
        files = []
        for s in m["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise SlayerError(f"{f}: missing; the manifest lists it with {s['records']} rows")
            files.append(str(f))
        try:
            self.source = grain.sources.ArrayRecordDataSource(files)
            n = len(self.source)
        except (RuntimeError, ValueError, OSError) as e:  # array_record's C++ reader: a damaged or truncated shard
            raise SlayerError(f"{self.path}: a shard is not a readable ArrayRecord file ({first_line(e)[:120]}); "
                              f"expected the files `slayer data prepare` writes (prepare again)") from None
        if n != int(m["counts"]["rows"]):
            raise SlayerError(f"{self.path}: the shards hold {n} rows; the manifest says {m['counts']['rows']}")
        self.stats = self._stats()

    def _stats(self):

        fields = {f.name for f in dataclasses.fields(PackStats)}
        return PackStats(seq_len=self.seq_len, **{k: int(v) for k, v in self.manifest["counts"].items()
                                                  if k in fields and k != "seq_len"})

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.path)!r}, {len(self)} rows of {self.seq_len})"

    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def records(self, indices: Sequence[int]) -> list[bytes]:
        idx = [int(i) for i in indices]
        return list(self.source.__getitems__(idx)) if hasattr(self.source, "__getitems__") \
            else [self.source[i] for i in idx]

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows ``indices`` as ``{key: [len(indices), seq_len]}`` (the in-memory loader's batch format)."""
        return rows_from_records(self.records(indices), self.seq_len)

    def pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Every stored document piece ``(tokens, mask or None)``, row by row (tests, inspection)."""
        for i in range(len(self)):
            toks, lens, m = decode_record(self.source[i])
            for a, b in zip(np.cumsum(lens) - lens, np.cumsum(lens)):
                yield toks[a:b], None if m is None else m[a:b]

    def check(self, tokenizer, *, seq_len: int, mode: str, separator) -> None:
        """One-line SlayerError unless this corpus was prepared for this tokenizer and these settings."""

        m, where = self.manifest, self.path / MANIFEST
        if self.seq_len != int(seq_len):
            raise SlayerError(f"{where}: field 'seq_len' is {self.seq_len}; data.seq_len is {seq_len}: "
                              f"expected the same (prepare again with --seq-len {seq_len})")
        if self.mode != mode:
            raise SlayerError(f"{where}: field 'mode' is {self.mode!r}; data.mode is {mode!r}: expected the same")
        tm = m["tokenizer"]
        vocab = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
        if int(tm.get("vocab_size", -1)) != vocab or tm.get("vocab_hash") not in (None, vocab_hash(tokenizer)):
            raise SlayerError(f"{where}: field 'tokenizer' is {tm.get('name')!r} (vocab {tm.get('vocab_size')}, hash "
                              f"{tm.get('vocab_hash')}); the model's tokenizer has vocab {vocab}, hash "
                              f"{vocab_hash(tokenizer)}: expected the same tokenizer")
        if mode == "text":
            want = separator_id(tokenizer, separator)
            if m.get("separator_id") != want:
                raise SlayerError(f"{where}: field 'separator_id' is {m.get('separator_id')!r}; data.separator "
                                  f"{separator!r} is {want!r} for this tokenizer: expected the same")


__all__ = ["prepare_corpus", "PreparedCorpus", "is_prepared", "read_manifest", "encode_record", "decode_record",
           "encode_packed", "rows_from_records", "load_tokenizer_arg", "provenance", "vocab_hash"]
