"""The training input pipeline: pack token lists into fixed-length rows, and a resumable grain loader.

The pipeline walks::

    source ──load_documents / load_chats──▶ texts or chats
           ──tokenize_documents / sft_example──▶ token lists (+ separator, + SFT loss masks)
           ──Documents.from_token_lists──▶ pieces of <= T tokens          (make_dataset does these three)
           ──make_loader──▶ every epoch: shuffle the documents, pack them (grain's best-fit packer),
                            batch: a grain iterator of [B, T] rows whose state resumes exactly
    (Documents.pack / pack_documents: the same packer once, in order, for evaluation)

Packed rows (what ``model.forward`` and the loss read)
------------------------------------------------------
``inputs``      int32 [N, T]  token ids; 0 on padding.
``targets``     int32 [N, T]  ``targets[r, i] = inputs[r, i+1]`` when token i+1 is in the same document
                              (same segment), else 0. Targets never cross documents or rows.
``positions``   int32 [N, T]  0, 1, 2, ... restarting at every document (and every chunk of a split one).
``segment_ids`` int32 [N, T]  1, 2, 3, ... per document inside a row; 0 on padding.
``weights``     float32 [N, T] 1 where ``targets`` is a real next token that counts in the loss, else 0
                              (each document's last token, padding, and in SFT every non-assistant target).

Loss = sum(weights * CE(logits, targets)) / sum(weights).

Packing rule: grain's *best fit* (``grain.experimental.BestFitPackIterDataset``): each document
(with its BOS / separator) goes whole into the open row with the least room that still fits it;
when none of the ``packing_bins`` open rows fits it, the open rows are emitted (in shuffled order
when training) and new ones start. Documents longer than ``seq_len`` are split into ``seq_len``
chunks (each chunk its own segment, positions restart; the one next-token target across each cut
is lost), dropped, or refused (``long_docs``). Every token of every kept document appears exactly
once per epoch in ``inputs``.

The separator after each raw-text document is the tokenizer's end-of-text token (``separator="auto"``),
never a chat end-of-turn token; SFT rows keep the chat template's own tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
from typing import Iterator, Sequence

import grain
import numpy as np

from slayer_jax import storage
from slayer_jax.data.sources import iter_chats, iter_documents
from slayer_jax.data.tokens import iter_tokenized, sft_example
from slayer_jax.errors import SlayerError

ARRAY_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
LONG_DOCS = ("split", "drop", "error")


# ============================================================================ pack
@dataclasses.dataclass
class PackStats:
    """What packing did. ``tokens`` counts kept tokens (BOS/EOS included); all are in ``inputs`` once.

    ``rows`` / ``padding`` / ``fill`` describe one packing of the whole corpus (one epoch; a
    reshuffled epoch packs within a row or two of it)."""

    seq_len: int = 0
    documents: int = 0          # non-empty token lists received
    empty: int = 0              # zero-length token lists skipped (plus empty source documents, in make_dataset)
    split: int = 0              # documents longer than seq_len that were split
    chunks: int = 0             # chunks those became (each is one segment)
    dropped: int = 0            # documents longer than seq_len that were dropped
    dropped_tokens: int = 0
    no_loss: int = 0            # SFT examples with no assistant token, skipped (make_dataset)
    tokens: int = 0             # tokens placed in rows
    loss_tokens: int = 0        # sum of weights
    rows: int = 0
    padding: int = 0

    @property
    def fill(self) -> float:
        """Fraction of row slots holding a token."""
        return self.tokens / max(1, self.rows * self.seq_len)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fill": self.fill}


_INT32_MAX = int(np.iinfo(np.int32).max)


def _segments(token_lists, loss_masks, seq_len, bos_id, eos_id, long_docs, stats):
    """Yield (tokens int32, mask int8 or None = all ones) pieces of at most seq_len tokens.

    Applies BOS/EOS and the long-document rule, and validates the token lists.
    """
    masks = itertools.repeat(None) if loss_masks is None else loss_masks
    yield from _segments_of(zip(token_lists, masks), seq_len, bos_id, eos_id, long_docs, stats)


def _segments_of(docs, seq_len, bos_id, eos_id, long_docs, stats):
    """:func:`_segments` over a stream of (token list, loss mask or None) pairs; adds each piece
    to ``stats.tokens`` / ``stats.loss_tokens`` too."""
    pre = np.asarray([] if bos_id is None else [int(bos_id)], np.int32)
    post = np.asarray([] if eos_id is None else [int(eos_id)], np.int32)
    for piece, mask in _segments_raw(docs, pre, post, seq_len, long_docs, stats):
        stats.tokens += int(piece.size)
        stats.loss_tokens += int(piece.size - 1 if mask is None else int(mask[1:].sum()))
        yield piece, mask


def _segments_raw(docs, pre, post, seq_len, long_docs, stats):
    for d, (toks, mask) in enumerate(docs):
        toks = np.asarray(toks)
        if toks.ndim != 1 or (toks.size and not np.issubdtype(toks.dtype, np.integer)):
            raise SlayerError(f"document {d}: token list has shape {toks.shape} and dtype {toks.dtype}; "
                              f"expected a 1-D list of integer token ids")
        if toks.size == 0:
            stats.empty += 1
            continue
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi > _INT32_MAX:
            raise SlayerError(f"document {d}: token id {lo if lo < 0 else hi} out of range; expected 0 <= id < 2**31")
        if mask is not None:
            mask = np.asarray(mask, np.int8)
            if mask.shape != toks.shape:
                raise SlayerError(f"document {d}: loss mask has shape {mask.shape}; expected {toks.shape}")
        if pre.size or post.size:
            toks = np.concatenate([pre, toks.astype(np.int32), post])
            if mask is not None:
                mask = np.concatenate([np.zeros(pre.size, np.int8), mask, np.ones(post.size, np.int8)])
        else:
            toks = toks.astype(np.int32, copy=False)
        stats.documents += 1
        n = toks.size
        if n <= seq_len:
            yield toks, mask
            continue
        if long_docs == "error":
            raise SlayerError(f"document {d}: {n} tokens is longer than seq_len {seq_len}; "
                              f"expected long_docs='split' or 'drop', or a larger seq_len")
        if long_docs == "drop":
            stats.dropped += 1
            stats.dropped_tokens += n
            continue
        stats.split += 1
        for s in range(0, n, seq_len):
            stats.chunks += 1
            yield toks[s: s + seq_len], None if mask is None else mask[s: s + seq_len]


def packed_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row of :data:`ARRAY_KEYS` from a row of grain's packer (``inputs``, ``mask`` and their
    ``_segment_ids`` / ``_positions``): next-token targets inside each segment, and the loss weight
    of position i = the mask of token i+1 (the token it predicts)."""
    tok = np.asarray(packed["inputs"], np.int32)
    seg = np.asarray(packed["inputs_segment_ids"], np.int32)
    same = np.zeros(tok.shape, bool)
    same[:-1] = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    targets = np.zeros_like(tok)
    targets[:-1] = tok[1:]
    weights = np.zeros(tok.shape, np.float32)
    weights[:-1] = packed["mask"][1:]
    return {"inputs": tok, "targets": np.where(same, targets, 0), "positions": np.asarray(packed["inputs_positions"],
            np.int32), "segment_ids": seg, "weights": np.where(same, weights, 0).astype(np.float32)}


@dataclasses.dataclass(eq=False)
class Documents:
    """A tokenised corpus ready to pack: pieces of at most ``seq_len`` tokens (separators added,
    long documents split or dropped) and, for SFT, their loss masks.

    Packing happens in the loader, after the documents are shuffled, so every epoch packs a new
    order into new rows (:func:`make_loader`); :meth:`pack` packs them once, in order (evaluation).
    """

    pieces: list[np.ndarray]
    masks: list[np.ndarray | None] | None
    seq_len: int
    stats: PackStats

    @classmethod
    def from_token_lists(cls, token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int | None = None,
                         eos_id: int | None = None, long_docs: str = "split",
                         loss_masks: Sequence[Sequence[int]] | None = None) -> "Documents":
        """``bos_id`` / ``eos_id``, when given, go around every document (leave them None if
        :func:`tokenize_documents` added them). ``long_docs`` for documents longer than ``seq_len``
        (after BOS/EOS): ``"split"`` into consecutive ``seq_len`` chunks, each a separate segment
        with positions from 0; ``"drop"``; ``"error"`` (SlayerError). Zero-length lists are skipped.
        ``loss_masks`` (SFT): per document, 1 on tokens to learn; an added BOS gets 0, an added EOS 1."""
        if int(seq_len) < 1:
            raise SlayerError(f"seq_len: {seq_len}; expected a positive integer")
        if long_docs not in LONG_DOCS:
            raise SlayerError(f"long_docs: {long_docs!r}; expected one of {list(LONG_DOCS)}")
        if loss_masks is not None and len(loss_masks) != len(token_lists):
            raise SlayerError(f"loss_masks: {len(loss_masks)} masks for {len(token_lists)} documents; "
                              f"expected one each")
        stats = PackStats(seq_len=int(seq_len))
        pieces, masks = [], []
        for toks, mask in _segments(token_lists, loss_masks, int(seq_len), bos_id, eos_id, long_docs, stats):
            pieces.append(toks)
            masks.append(mask)
        return cls(pieces, None if loss_masks is None else masks, int(seq_len), stats)

    kind = "pieces"  # make_loader packs these every epoch (a prepared corpus is "rows": packed once)

    def __len__(self) -> int:
        return len(self.pieces)

    def __repr__(self) -> str:  # grain names pipeline stages by repr; never print every piece
        return f"Documents({len(self)} pieces, seq_len={self.seq_len}, sft={self.masks is not None})"

    def element(self, i: int) -> dict[str, np.ndarray]:
        """Piece ``i`` as grain's packer reads it: ``inputs`` and its loss ``mask`` (all ones for text)."""
        toks = self.pieces[int(i)]
        mask = None if self.masks is None else self.masks[int(i)]
        return {"inputs": toks, "mask": np.ones(toks.size, np.int8) if mask is None else mask}

    def fingerprint(self, max_pieces: int = 4096) -> str:
        """A short hash of the pieces (stored in the loader state, checked on restore): every length,
        and the tokens and masks of up to ``max_pieces`` evenly spaced pieces."""

        h = hashlib.sha256(f"{self.seq_len}/{len(self)}/{self.masks is not None}".encode())
        h.update(np.fromiter((p.size for p in self.pieces), np.int64, len(self)).tobytes())
        idx = range(len(self)) if len(self) <= max_pieces else np.linspace(0, len(self) - 1, max_pieces).astype(int)
        for i in idx:
            e = self.element(i)
            h.update(e["inputs"].tobytes())
            h.update(e["mask"].tobytes())
        return h.hexdigest()[:16]

    def pack(self, *, packing_bins: int = 64) -> dict[str, np.ndarray]:
        """All pieces packed once, in order, no shuffling: ``{key: [rows, seq_len]}``. Fills in ``stats.rows``."""
        if not len(self):
            raise SlayerError("documents: nothing to pack; expected at least one non-empty document")
        rows = list(_packed_rows(self, order=grain_range(len(self)), seed=0, shuffle_bins=False,
                                 packing_bins=packing_bins))
        arrays = {k: np.stack([r[k] for r in rows]) for k in ARRAY_KEYS}
        self.stats.rows = len(rows)
        self.stats.padding = len(rows) * self.seq_len - self.stats.tokens
        return arrays

    def count_rows(self, *, seed: int = 0, shuffle: bool = True, packing_bins: int = 64, shard_index: int = 0,
                   shard_count: int = 1) -> int:
        """Rows one epoch of :func:`make_loader` yields on this shard (epoch 0 exactly; later epochs
        pack a different order into about as many). Fills in ``stats.rows`` / ``padding`` on shard 0."""
        order = _shard_order(len(self), seed, shuffle, shard_index, shard_count, epochs=1)
        n = sum(1 for _ in _packed_rows(self, order=order, seed=seed, shuffle_bins=shuffle,
                                        packing_bins=packing_bins))
        if shard_count == 1:
            self.stats.rows = n
            self.stats.padding = n * self.seq_len - self.stats.tokens
        return n


def grain_range(n: int):

    return grain.MapDataset.range(int(n))


def _shard_order(n: int, seed: int, shuffle: bool, shard_index: int, shard_count: int, epochs: int | None,
                 seed_mixed: bool = False):
    """Piece indices this shard reads: a disjoint, strided share (every shard as many), shuffled
    with a seed mixed from ``seed`` and reshuffled every epoch (grain: seed + epoch)."""
    per_shard = n // shard_count
    if per_shard == 0:
        raise SlayerError(f"documents: {n} pieces for {shard_count} shards; expected at least one per shard")
    ds = grain_range(per_shard * shard_count)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed if seed_mixed else _grain_seed(seed))
    return ds.repeat(epochs)


def _packed_rows(docs: Documents, *, order, seed: int, shuffle_bins: bool, packing_bins: int,
                 seed_mixed: bool = False):
    """grain pipeline: piece indices -> pieces -> grain's best-fit packer -> rows of ARRAY_KEYS."""

    T = docs.seq_len
    packed = grain.experimental.BestFitPackIterDataset(
        order.map(docs.element).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
        length_struct={"inputs": T, "mask": T},
        num_packing_bins=int(packing_bins), seed=seed if seed_mixed else _grain_seed(seed),
        shuffle_bins=shuffle_bins)
    return packed.map(packed_row)


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int | None = None,
                   eos_id: int | None = None, long_docs: str = "split",
                   loss_masks: Sequence[Sequence[int]] | None = None) -> tuple[dict[str, np.ndarray], PackStats]:
    """Pack whole documents, in order, into rows of ``seq_len``; returns ``(arrays, PackStats)``.

    :meth:`Documents.from_token_lists` (BOS/EOS, long documents, loss masks) then
    :meth:`Documents.pack` (grain's best-fit packer, no shuffling). ``arrays`` has the keys of
    :data:`ARRAY_KEYS`, each ``[N, seq_len]`` (see the module docstring).
    """
    docs = Documents.from_token_lists(token_lists, seq_len, bos_id=bos_id, eos_id=eos_id, long_docs=long_docs,
                                      loss_masks=loss_masks)
    return docs.pack(), docs.stats


# ============================================================================ loader
@functools.lru_cache(maxsize=None)
def _make_checked_dataset():
    """An IterDataset that adds the loader config to the state and checks it on restore."""

    class _CheckedIterator(grain.DatasetIterator):
        def __init__(self, parent, config: dict):
            super().__init__(parent)
            self._config = config

        def __next__(self):
            return next(self._parent)

        def get_state(self) -> dict:
            return {"loader": dict(self._config), "grain": self._parent.get_state()}

        def set_state(self, state: dict) -> None:
            if not isinstance(state, dict) or "grain" not in state or "loader" not in state:
                raise SlayerError(f"data iterator state: keys {sorted(state) if isinstance(state, dict) else state!r}; "
                                  f"expected a state from slayer_jax.data.get_state")
            saved = state["loader"]
            for k, v in self._config.items():
                if saved.get(k) != v:
                    raise SlayerError(f"data iterator state: '{k}' was {saved.get(k)!r} when saved, now {v!r}; "
                                      f"resume with the same data and loader settings")
            self._parent.set_state(state["grain"])

    class _CheckedIterDataset(grain.IterDataset):
        def __init__(self, parent, config: dict):
            super().__init__(parent)
            self._config = config

        def __iter__(self):
            return _CheckedIterator(self._parent.__iter__(), self._config)

    return _CheckedIterDataset


def _grain_seed(seed: int) -> int:
    """A 32-bit shuffle seed mixed from ``seed``. grain reshuffles epoch e with seed + e, so mixing keeps
    seed s's second epoch from being seed s+1's first."""
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


def default_packing_bins(batch_size: int) -> int:
    """Rows the packer keeps open at once: at least a batch, at least 16 (fuller rows)."""
    return max(16, int(batch_size))


@dataclasses.dataclass(eq=False)
class Mixture:
    """Several sources of one kind (all :class:`Documents`, or all prepared
    :class:`~slayer_jax.data.prepare.PreparedCorpus`) drawn in proportion to ``weights`` (rows)."""

    sources: list
    weights: list[float]

    def __post_init__(self):
        if not self.sources or len(self.sources) != len(self.weights):
            raise SlayerError(f"mixture: {len(self.sources)} sources and {len(self.weights)} weights; "
                              f"expected at least one source and one weight each")
        kinds = {getattr(s, "kind", None) for s in self.sources}
        if len(kinds) != 1 or kinds - {"pieces", "rows"}:
            raise SlayerError("mixture: mixes prepared directories and raw sources; expected every component "
                              "prepared with `slayer data prepare`, or none")
        if len({s.seq_len for s in self.sources}) != 1:
            raise SlayerError(f"mixture: seq_len {[s.seq_len for s in self.sources]}; expected one seq_len")
        for w in self.weights:
            if not (float(w) > 0 and np.isfinite(float(w))):
                raise SlayerError(f"mixture: weight {w!r}; expected a positive number")

    @property
    def kind(self) -> str:
        return self.sources[0].kind

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def fingerprint(self) -> str:
        return ",".join(s.fingerprint() for s in self.sources)


def _component_seed(seed: int, i: int, n: int) -> int:
    """Component i's shuffle seed; a lone source keeps :func:`_grain_seed` (seed)."""
    if n == 1:
        return _grain_seed(seed)
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint32)[0])


def make_loader(docs, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                packing_bins: int | None = None, prefetch: int = 0, local_rows: slice | None = None):
    """A resumable iterator of packed batches ``{key: [batch_size, seq_len]}``: this process's share.

    ``batch_size`` is the per-process batch (global = batch_size * shard_count). Shards default to
    ``jax.process_index()`` / ``jax.process_count()``. ``docs`` is a document source of one of
    two kinds, or a :class:`Mixture` of sources of one kind:

    **pieces** (:class:`Documents`, in memory): shuffle, then pack, every epoch, per process::

        MapDataset.range(pieces)          # piece indices, truncated so every shard gets as many
          [shard_index::shard_count]      # this host's documents: disjoint, strided
          .shuffle(mix(seed))             # a seeded permutation of the documents (skipped if shuffle=False)
          .repeat(num_epochs)             # None = forever; a new permutation each epoch (mix(seed) + epoch)
          .map(piece)                     # {"inputs", "mask"}
          -> grain.experimental.BestFitPackIterDataset(packing_bins open rows, rows emitted in shuffled order)
          .map(packed_row)                # targets, positions, segment ids, loss weights
          [IterDataset.mix(components, weights)]
          .batch(batch_size, drop_remainder=True)   # batches run across epoch boundaries

      So documents that sit next to each other in the file land in unrelated rows, and in other
      rows every epoch; the rows depend on the process count.

    **rows** (:class:`slayer_jax.data.prepare.PreparedCorpus`, packed once by ``slayer data prepare``):
    rows are sharded *after* a global shuffle, so every process count reads the same global batches::

        MapDataset.range(rows).shuffle(mix(seed)).repeat(num_epochs)   # per component
          [MapDataset.mix(components, weights)]   # deterministic interleave in proportion to weights
          .batch(batch_size * shard_count)        # global batch g: row ids, the same on every process
          .map(read rows [shard_index*batch_size : (shard_index+1)*batch_size] of it)
          .to_iter_dataset(prefetch threads)

      Each row appears exactly once per epoch across processes; the union of the processes'
      batches is the 1-process global batch. The state is a global batch index, the same on every
      process (``slayer train`` still resumes only with the process count that saved it: each
      process restores its own ``process_I-of-N`` file). ``packing_bins`` is
      unused (packing happened at prepare). ``local_rows=slice(lo, hi)`` (rows only, with
      ``shard_count=1`` and ``batch_size`` = the global batch) reads just rows ``lo:hi`` of each
      global batch: the rows ``multihost.local_rows`` says this process's devices hold.

    The state is grain's plus the loader settings and a fingerprint of the data, which
    :func:`set_state` checks. The returned object is a ``grain.DatasetIterator``: :func:`get_state` /
    :func:`set_state` (JSON-serialisable dicts) work on it, and so do orbax's
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
    """

    kind = getattr(docs, "kind", None)
    if not isinstance(docs, (Documents, Mixture)) and kind != "rows":
        raise SlayerError(f"make_loader: got {type(docs).__name__}; expected slayer_jax.data.Documents "
                          f"(from make_dataset or Documents.from_token_lists), a PreparedCorpus or a Mixture")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (0 <= shard_index < shard_count):
        raise SlayerError(f"shard_index {shard_index}: expected 0 <= shard_index < shard_count ({shard_count})")
    if batch_size < 1:
        raise SlayerError(f"batch_size: {batch_size}; expected a positive integer")
    if not 0 <= int(seed) < 2**63:
        raise SlayerError(f"seed: {seed}; expected a non-negative integer")
    if num_epochs is not None:
        num_epochs = int(num_epochs)
        if num_epochs < 1:
            raise SlayerError(f"num_epochs: {num_epochs}; expected a positive integer or None (forever)")
    comps, weights = (docs.sources, [float(w) for w in docs.weights]) if isinstance(docs, Mixture) else ([docs], None)
    if local_rows is not None and (kind != "rows" or shard_count != 1 or not
                                   0 <= (local_rows.start or 0) < (local_rows.stop or 0) <= batch_size):
        raise SlayerError(f"local_rows: {local_rows}; expected a prepared source, shard_count=1 and a non-empty "
                          f"slice of the global batch of {batch_size}")
    if kind == "rows":
        if local_rows is not None:
            lo, hi = (local_rows.start or 0), local_rows.stop
            return _row_loader(docs, comps, weights, batch_size=int(batch_size), seed=int(seed), shuffle=bool(shuffle),
                               num_epochs=num_epochs, shard_index=0, shard_count=1, prefetch=int(prefetch),
                               rows=(lo, hi))
        return _row_loader(docs, comps, weights, batch_size=int(batch_size), seed=int(seed), shuffle=bool(shuffle),
                           num_epochs=num_epochs, shard_index=int(shard_index), shard_count=int(shard_count),
                           prefetch=int(prefetch))
    bins = default_packing_bins(batch_size) if packing_bins is None else int(packing_bins)
    if bins < 1:
        raise SlayerError(f"packing_bins: {bins}; expected a positive integer")
    streams = []
    for i, d in enumerate(comps):
        s = _component_seed(seed, i, len(comps))
        order = _shard_order(len(d), s, shuffle, shard_index, shard_count, num_epochs, seed_mixed=True)
        streams.append(_packed_rows(d, order=order, seed=s, shuffle_bins=shuffle, packing_bins=bins,
                                    seed_mixed=True))
    ds = streams[0] if weights is None else grain.IterDataset.mix(streams, weights)
    ds = ds.batch(int(batch_size), drop_remainder=True)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(prefetch))
    config = {"documents": len(docs), "seq_len": docs.seq_len, "batch_size": int(batch_size),
              "seed": int(seed), "shuffle": bool(shuffle), "num_epochs": num_epochs, "packing_bins": bins,
              "shard_index": int(shard_index), "shard_count": int(shard_count),
              "fingerprint": docs.fingerprint()}
    if weights is not None:
        config["weights"] = weights
    return iter(_make_checked_dataset()(ds, config))


def _row_loader(docs, comps, weights, *, batch_size, seed, shuffle, num_epochs, shard_index, shard_count, prefetch,
                rows=None):

    parts = []
    for i, c in enumerate(comps):
        order = grain.MapDataset.range(len(c))
        if shuffle:
            order = order.shuffle(seed=_component_seed(seed, i, len(comps)))
        parts.append(order.repeat(num_epochs).map(functools.partial(_tag, i)))
    ds = parts[0] if weights is None else grain.MapDataset.mix(parts, weights)
    global_batch = batch_size * shard_count
    ds = ds.batch(global_batch, drop_remainder=True)
    lo, hi = rows or (shard_index * batch_size, (shard_index + 1) * batch_size)
    ds = ds.map(functools.partial(_read_slice, comps, lo, hi))
    threads = min(int(prefetch), 16)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=int(prefetch)))
    config = {"rows": [len(c) for c in comps], "seq_len": docs.seq_len, "global_batch": global_batch,
              "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs, "weights": weights,
              "fingerprint": docs.fingerprint()}
    return iter(_make_checked_dataset()(it_ds, config))


def _tag(component: int, i) -> tuple[int, int]:
    return component, int(i)


def _read_slice(comps, lo: int, hi: int, ids) -> dict[str, np.ndarray]:
    """Rows ``lo:hi`` of a global batch of (component, row) ids, read and decoded, in batch order."""
    which, rows = np.asarray(ids[0])[lo:hi], np.asarray(ids[1])[lo:hi]
    if len(comps) == 1:
        return comps[0].read(rows)
    out = None
    for c in np.unique(which):
        sel = np.flatnonzero(which == c)
        part = comps[int(c)].read(rows[sel])
        if out is None:
            out = {k: np.zeros((hi - lo,) + v.shape[1:], v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][sel] = v
    return out


def get_state(it) -> dict:
    """The loader's position as a JSON-serialisable dict (``json.dumps`` it, or let orbax do it)."""
    state = it.get_state()
    json.dumps(state)  # fail here, not at checkpoint time
    return state


def set_state(it, state: dict | str | bytes) -> None:
    """Restore a :func:`get_state` dict (or its JSON text/bytes): the next batches are the ones that followed it."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    it.set_state(state)


def state_to_bytes(it) -> bytes:
    """:func:`get_state` as JSON bytes (what to store beside a checkpoint if not using grain's handler)."""
    return json.dumps(get_state(it), sort_keys=True).encode()


# ============================================================================ all together
def make_dataset(source: str | os.PathLike, tokenizer, seq_len: int, *, mode: str = "text", field: str | None = None,
                 split: str = "train", add_bos: bool | None = None, separator: str | int | None = "auto",
                 long_docs: str | None = None, progress: bool = False) -> Documents:
    """Load and tokenise ``source`` into :class:`Documents` (``.stats`` says what was kept), ready
    for :func:`make_loader` (training: shuffled and packed anew every epoch) or ``.pack()``.

    ``mode="text"``: :func:`load_documents` (``field`` default ``"text"``), :func:`tokenize_documents`
    (BOS per ``add_bos``, then ``separator`` after every document: by default the end-of-text
    token, see :func:`separator_id`), long documents per ``long_docs`` (default ``"split"``); every
    next token in a document counts in the loss.

    ``mode="sft"``: :func:`load_chats` (``field`` default ``"messages"``), :func:`sft_example` with the
    tokenizer's chat template (no extra BOS or separator: the template has its own tokens), loss
    masks on the assistant tokens (``long_docs`` default ``"drop"``: a cut conversation would train
    answers without their question). Conversations without an assistant token are skipped and
    counted in ``stats.no_loss``.
    """
    stats = PackStats(seq_len=int(seq_len))
    pieces, masks = [], []
    for toks, mask in iter_pieces(source, tokenizer, seq_len, stats=stats, mode=mode, field=field, split=split,
                                  add_bos=add_bos, separator=separator, long_docs=long_docs, progress=progress):
        pieces.append(toks)
        masks.append(mask)
    return Documents(pieces, masks if mode == "sft" else None, int(seq_len), stats)


def iter_pieces(source: str | os.PathLike, tokenizer, seq_len: int, *, stats: PackStats, mode: str = "text",
                field: str | None = None, split: str = "train", add_bos: bool | None = None,
                separator: str | int | None = "auto", long_docs: str | None = None,
                progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The one tokenisation of a source, as a stream: ``(tokens int32, loss mask int8 or None =
    all ones)`` pieces of at most ``seq_len`` tokens, in source order, with ``stats`` filled in as
    it goes (complete once the stream is exhausted). :func:`make_dataset` collects it;
    ``slayer data prepare`` (:mod:`slayer_jax.data.prepare`) writes it to shards without holding the corpus.
    Arguments as :func:`make_dataset`. A gs:// file or directory is fetched once per host into the
    cache first (:func:`slayer_jax.storage.cached_copy`)."""

    if storage.is_remote(source):
        source = storage.cached_copy(str(source))
    if int(seq_len) < 1:
        raise SlayerError(f"seq_len: {seq_len}; expected a positive integer")
    if mode not in ("text", "sft"):
        raise SlayerError(f"mode: {mode!r}; expected 'text' or 'sft'")
    long_docs = long_docs or ("split" if mode == "text" else "drop")
    if long_docs not in LONG_DOCS:
        raise SlayerError(f"long_docs: {long_docs!r}; expected one of {list(LONG_DOCS)}")
    if mode == "text":
        counts = {"empty": 0}
        docs = iter_documents(source, field=field or "text", split=split, counts=counts)
        toks = iter_tokenized(tokenizer, docs, add_bos=add_bos, separator=separator, progress=progress)
        yield from _segments_of(((t, None) for t in toks), int(seq_len), None, None, long_docs, stats)
        stats.empty += counts["empty"]
        return

    def examples():
        it = iter_chats(source, field=field or "messages", split=split)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="sft", unit="chat")
        kept = 0
        for i, msgs in enumerate(it):
            try:
                t, m = sft_example(tokenizer, msgs)
            except SlayerError as e:
                raise SlayerError(f"{source}: conversation {i + 1}: {e}") from None
            if not m.any():
                stats.no_loss += 1
                continue
            kept += 1
            yield t, m
        if not kept:
            raise SlayerError(f"{source}: no conversation has an assistant message; expected some for SFT")

    yield from _segments_of(examples(), int(seq_len), None, None, long_docs, stats)
