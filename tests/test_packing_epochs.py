"""Shuffle, then pack, every epoch: documents that sit together in the file do not share rows more
often than chance, rows change between epochs, and the order and packing resume exactly after a
real SIGKILL. The reference for "chance" is computed from the rows themselves; the file-order
packing that training used before is checked to fail the same test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from slayer_jax import data as D


def clustered_corpus(n_people: int = 60, per_person: int = 3, seed: int = 0):
    """Short documents, the paraphrases of one "person" next to each other in the file (as a naive
    corpus has them); document d is the token 1000 + d repeated, so rows tell which documents they hold."""
    rng = np.random.default_rng(seed)
    toks, owner = [], []
    for p in range(n_people):
        for _ in range(per_person):
            toks.append([1000 + len(toks)] * int(rng.integers(6, 14)))
            owner.append(p)
    return toks, owner


def rows_by_epoch(batches, n_docs: int) -> list[list[list[int]]]:
    """Each row's documents, split by the epoch of each document's occurrence (its 1st, 2nd, ...).
    A row near an epoch boundary can hold documents of both epochs: the packer's window of open
    rows straddles it; such a row counts once in each epoch, with that epoch's documents."""
    seen = Counter()
    epochs: dict[int, list[list[int]]] = {}
    for b in batches:
        for row, seg in zip(b["inputs"], b["segment_ids"]):
            by_epoch: dict[int, list[int]] = {}
            for d in sorted({int(t) - 1000 for t, s in zip(row, seg) if s > 0}):
                by_epoch.setdefault(seen[d], []).append(d)
                seen[d] += 1
            for e, docs in by_epoch.items():
                epochs.setdefault(e, []).append(docs)
    assert len(seen) == n_docs and set(seen.values()) <= {len(epochs) - 1, len(epochs)}
    return [epochs[e] for e in sorted(epochs)]


def pairs(rows) -> set[tuple[int, int]]:
    return {(a, b) for docs in rows for i, a in enumerate(docs) for b in docs[i + 1:]}


def test_neighbours_share_rows_no_more_than_chance_over_two_epochs():
    toks, owner = clustered_corpus()
    n = len(toks)
    docs = D.Documents.from_token_lists(toks, 32)
    it = D.make_loader(docs, batch_size=4, seed=11, num_epochs=2, shard_index=0, shard_count=1, packing_bins=8)
    first, second = rows_by_epoch(list(it), n)
    p1, p2 = pairs(first), pairs(second)
    all_pairs = n * (n - 1) / 2
    # independent packings: a pair of the first epoch is together again with probability |p2| / all pairs
    expected_both = len(p1) * len(p2) / all_pairs
    both = len(p1 & p2)
    assert both <= expected_both + 4 * np.sqrt(expected_both) + 2, (both, expected_both)
    # the paraphrases of one person (adjacent in the file) are together no more often than any pair
    same = sum(owner[a] == owner[b] for a, b in p1 | p2)
    expected_same = len(p1 | p2) * (n // len(set(owner)) - 1) / (n - 1)
    assert same <= expected_same + 4 * np.sqrt(expected_same) + 2, (same, expected_same)
    assert first != second

    # the check can fail: packed once in file order, neighbours share rows, and every epoch the same rows
    fixed = D.make_loader(docs, batch_size=4, seed=11, shuffle=False, num_epochs=2, shard_index=0, shard_count=1,
                          packing_bins=8)
    f1, f2 = rows_by_epoch(list(fixed), n)
    assert len(pairs(f1) & pairs(f2)) > expected_both + 4 * np.sqrt(expected_both) + 2
    assert sum(owner[a] == owner[b] for a, b in pairs(f1)) > expected_same + 4 * np.sqrt(expected_same) + 2


def test_different_seeds_pack_differently_and_same_seed_identically():
    toks, _ = clustered_corpus(20)
    docs = D.Documents.from_token_lists(toks, 32)
    read = lambda seed: [b["inputs"].tolist() for b in D.make_loader(  # noqa: E731
        docs, batch_size=2, seed=seed, num_epochs=2, shard_index=0, shard_count=1)]
    assert read(3) == read(3)
    assert read(3) != read(4)


CHILD = r'''
import json, os, sys
from slayer_jax import data as D
toks = [[1000 + i] * (5 + (7 * i) % 11) for i in range(90)]
it = D.make_loader(D.Documents.from_token_lists(toks, 24), batch_size=3, seed=5, shard_index=0, shard_count=1)
out, total = sys.argv[1], int(sys.argv[2])
done = sorted(int(f.split(".")[0]) for f in os.listdir(out) if f.endswith(".json"))
if done:  # resume from the last batch that was committed with its state
    D.set_state(it, json.load(open(os.path.join(out, f"{done[-1]:05d}.json")))["state"])
for i in range(done[-1] + 1 if done else 0, total):
    b = next(it)
    rec = {"inputs": b["inputs"].tolist(), "segment_ids": b["segment_ids"].tolist(), "state": D.get_state(it)}
    tmp = os.path.join(out, f".{i:05d}.tmp")
    with open(tmp, "w") as f:       # one file per step, batch and state together: temporary file, then rename
        json.dump(rec, f)
    os.replace(tmp, os.path.join(out, f"{i:05d}.json"))
    if os.environ.get("SLOW"):
        import time; time.sleep(0.03)
'''


def _batches(d):
    return [{k: v for k, v in json.load(open(d / f)).items() if k != "state"}
            for f in sorted(os.listdir(d)) if f.endswith(".json")]


def test_order_and_packing_resume_exactly_after_sigkill(tmp_path):
    """90 documents of 5-15 tokens in rows of 24 (~45 rows an epoch), 60 batches of 3: four epochs."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    total = 60
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    subprocess.run([sys.executable, str(script), str(ref), str(total)], check=True, timeout=300)
    child = subprocess.Popen([sys.executable, str(script), str(run), str(total)], env=dict(os.environ, SLOW="1"))
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run.glob("*.json"))) < 25 and child.poll() is None:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = len(list(run.glob("*.json")))
    assert 25 <= killed_at < total, "the kill must land mid-run"
    subprocess.run([sys.executable, str(script), str(run), str(total)], check=True, timeout=300)
    got, want = _batches(run), _batches(ref)
    assert len(got) == len(want) == total
    assert got == want
    assert got[killed_at - 1] != got[killed_at]
