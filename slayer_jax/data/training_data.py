"""What a training run reads: raw sources (tokenised and packed in memory, every epoch anew) or
corpora packed once by ``slayer data prepare``, one or a weighted mixture, behind one call.

It sits above both :mod:`slayer_jax.data` (sources, packing, the grain loader) and
:mod:`slayer_jax.data.prepare` (ArrayRecord corpora), which know nothing of each other's callers.
"""

from __future__ import annotations

import dataclasses
import math

from slayer_jax.data import (
    Mixture,
    PackStats,
    default_packing_bins,
    make_dataset,
    make_loader,
    parse_sources,
    separator_id,
)
from slayer_jax.data.prepare import PreparedCorpus, is_prepared
from slayer_jax.errors import SlayerError


@dataclasses.dataclass
class DataInfo:
    """What :func:`open_training_data` opened, for ``describe_run`` and the step count."""

    source: str
    kind: str                       # "prepared" (packed once, rows sharded globally) | "in-memory"
    stats: PackStats                # summed over components
    rows_per_epoch: int | None      # global rows per epoch (sum over components); None if not counted
    separator: int | None           # the id after each raw-text document; None for SFT or "none"
    sft: bool
    components: list[dict]          # {"source", "weight", "rows"} per component
    packing_note: str               # the describe_run phrase on shuffling/packing

    def steps(self, *, epochs: float, steps: int, global_batch: int) -> int:
        """``steps``, or with ``epochs`` > 0 the global batches that read that many epochs of rows."""
        if epochs <= 0:
            return int(steps)
        if self.rows_per_epoch is None:
            raise SlayerError("epochs: rows per epoch were not counted; call open_training_data(count_rows=True)")
        return max(1, math.ceil(epochs * self.rows_per_epoch / int(global_batch)))


def open_training_data(cdata, tokenizer, *, seed: int, batch_size: int, process_index: int | None = None,
                       process_count: int | None = None, count_rows: bool = False, progress: bool = False,
                       prefetch: int | None = None, local_rows: slice | None = None):
    """``(loader, DataInfo)`` for a config's ``data`` block: the one call training makes.

    ``cdata.source`` is one source or a mixture ``"A@1.0;B@1.5"``. Each component is a directory
    written by ``slayer data prepare`` (streamed from its ArrayRecord shards; checked against the
    tokenizer, ``seq_len``, ``mode`` and ``separator``) or any raw source :func:`make_dataset` takes
    (tokenised in memory). Components must all be prepared or all raw. ``batch_size`` is the
    **per-process** batch (global = batch_size * process_count); processes default to jax's.
    ``count_rows`` (only needed for ``epochs`` > 0) packs an epoch ahead for raw sources; prepared
    ones know their rows from the manifest. ``prefetch``: batches read ahead (default 2 for prepared
    sources, 0 for in-memory). ``local_rows`` (prepared sources; with process_count=1 and batch_size =
    the global batch): read only those rows of each global batch (see :func:`make_loader`)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    mode = cdata.get("mode", "text") or "text"
    field = cdata.get("field", None) or None
    separator = cdata.get("separator", "auto") or "auto"
    seq_len = int(cdata.seq_len)
    comps = parse_sources(cdata.source)
    prepared = [is_prepared(src) for src, _ in comps]
    if any(prepared) and not all(prepared):
        raw = [src for (src, _), p in zip(comps, prepared) if not p]
        raise SlayerError(f"data.source: {raw[0]!r} is not a prepared directory but other components are; "
                          f"expected every component prepared with `slayer data prepare`, or none")
    sources = []
    for src, _ in comps:
        if all(prepared):
            pc = PreparedCorpus(src)
            pc.check(tokenizer, seq_len=seq_len, mode=mode, separator=separator)
            sources.append(pc)
        else:
            sources.append(make_dataset(src, tokenizer, seq_len, mode=mode, field=field, separator=separator,
                                        progress=progress))
    source = sources[0] if len(sources) == 1 else Mixture(sources, [w for _, w in comps])
    bins = int(cdata.get("packing_bins", 0) or 0) or default_packing_bins(batch_size)
    if prefetch is None:
        prefetch = 2 if all(prepared) else 0
    loader = make_loader(source, batch_size=int(batch_size), seed=int(seed), packing_bins=bins,
                         shard_index=int(process_index), shard_count=int(process_count), prefetch=int(prefetch),
                         local_rows=local_rows if all(prepared) else None)
    rows: list[int | None] = []
    for i, s in enumerate(sources):
        if all(prepared):
            rows.append(len(s))
        elif count_rows:
            per = s.count_rows(seed=int(seed), packing_bins=bins, shard_index=int(process_index),
                               shard_count=int(process_count))
            rows.append(per * int(process_count))
        else:
            rows.append(None)
    stats = PackStats(seq_len=seq_len)
    for s in sources:
        for f in dataclasses.fields(PackStats):
            if f.name != "seq_len":
                setattr(stats, f.name, getattr(stats, f.name) + getattr(s.stats, f.name))
    note = ("packed once by `slayer data prepare` (documents shuffled once); rows reshuffled every epoch"
            if all(prepared) else "documents reshuffled and repacked every epoch")
    info = DataInfo(source=str(cdata.source), kind="prepared" if all(prepared) else "in-memory", stats=stats,
                    rows_per_epoch=None if None in rows else int(sum(rows)),
                    separator=None if mode == "sft" else separator_id(tokenizer, separator), sft=mode == "sft",
                    components=[{"source": src, "weight": w, "rows": r} for (src, w), r in zip(comps, rows)],
                    packing_note=note)
    return loader, info
