"""The demo's offline domain corpus: real Python code from the standard library on this machine.

``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (skipping ``site-packages``, test
packages and the generated codec tables of ``encodings``), deduplicated by content hash, split *by file* into train and held-out with a hash of
the file's content (so the split does not depend on the machine's file order), and written as
JSONL ``{"text", "path"}`` for the data pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3", "turtledemo",
             "encodings"}  # encodings: generated codec tables, not code anyone writes


def stdlib_python_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def build_code_corpus(out_dir: str | Path, *, heldout_frac: float = 0.1, min_bytes: int = 500,
                      max_bytes: int = 40_000, train_budget: int = 4_000_000, heldout_budget: int = 400_000,
                      root: str | Path | None = None) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``out_dir``; returns the manifest.

    Files outside [min_bytes, max_bytes] are skipped (tiny stubs, huge generated tables);
    exact duplicates (same sha256) are kept once. Each side stops at its byte budget, in a
    hash-shuffled order, so the sample is spread over the whole library.
    """
    out_dir = Path(out_dir)
    seen: set[str] = set()
    files = []
    stats = {"scanned": 0, "duplicates": 0, "size_filtered": 0, "undecodable": 0}
    for p in stdlib_python_files(root):
        stats["scanned"] += 1
        data = p.read_bytes()
        if not min_bytes <= len(data) <= max_bytes:
            stats["size_filtered"] += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["undecodable"] += 1
            continue
        files.append((digest, p, text))
    files.sort(key=lambda f: f[0])  # content-hash order: deterministic and spread out
    split = {"train": [], "heldout": []}
    used = {"train": 0, "heldout": 0}
    budget = {"train": train_budget, "heldout": heldout_budget}
    for digest, p, text in files:
        side = "heldout" if int(digest[:8], 16) / 0xFFFFFFFF < heldout_frac else "train"
        if used[side] + len(text) > budget[side]:
            continue
        split[side].append({"text": text, "path": str(p)})
        used[side] += len(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    for side, rows in split.items():
        tmp = out_dir / f".{side}.jsonl.tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tmp.replace(out_dir / f"{side}.jsonl")
    manifest = {"source": str(Path(root or sysconfig.get_paths()["stdlib"])), **stats,
                "files": {k: len(v) for k, v in split.items()}, "bytes": used,
                "train_paths_sample": [r["path"] for r in split["train"][:5]]}
    assert not {r["path"] for r in split["train"]} & {r["path"] for r in split["heldout"]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
