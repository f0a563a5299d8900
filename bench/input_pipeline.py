"""Input pipeline throughput: `slayer data prepare` (tokens/s per core) and the training loader
(tokens/s, prepared ArrayRecord rows vs the in-memory per-epoch packer), on a generated corpus.

    RAYON_NUM_THREADS=1 python bench/input_pipeline.py --mb 4 --seq-len 1024 --batch 16

Prints a markdown table (for bench/RESULTS.md). Tokenizer: the default model's (SmolLM2, 49k vocab)
when cached, else the tests' tiny byte-level BPE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for the tokenizer: per-core figures
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tokenizer(name: str):
    from slayer_jax.data.prepare import load_tokenizer_arg

    if name != "tiny":
        try:
            return load_tokenizer_arg(name), name
        except Exception as e:  # noqa: BLE001 - not cached: fall back to the test tokenizer
            print(f"({name}: {e}; using the tiny test tokenizer)", file=sys.stderr)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_tok import make_tokenizer

    return make_tokenizer(), "tiny BPE (512)"


def corpus(path: Path, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    words = ("the of and to in is that for it as with was on be by this are from or an at which def return "
             "import self if else for while class print value number function lemma proof theorem let").split()
    n = 0
    with open(path, "w") as f:
        while n < mb * 2**20:
            doc = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(5.5, 1.0))))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            n += len(line)
    return n


def loader_rate(it, n_batches: int, tokens_per_batch: int) -> tuple[float, float]:
    next(it)  # warm-up (opens readers, fills the packer's window)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t
    return n_batches * tokens_per_batch / dt, dt / n_batches * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tokenizer", default="default")
    a = ap.parse_args()

    from slayer_jax import data as D
    from slayer_jax.data.prepare import PreparedCorpus, prepare_corpus

    tok, tok_name = tokenizer(a.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix="slayer_bench_"))
    try:
        src = tmp / "corpus.jsonl"
        nbytes = corpus(src, a.mb)
        t = time.perf_counter()
        m = prepare_corpus(src, tok, tmp / "prepared", seq_len=a.seq_len, shards=a.shards)
        prep_s = time.perf_counter() - t
        c = m["counts"]
        t = time.perf_counter()
        docs = D.make_dataset(src, tok, a.seq_len)
        mem_tok_s = time.perf_counter() - t
        tpb = a.batch * a.seq_len
        pc = PreparedCorpus(tmp / "prepared")
        rows = []
        for name, make in (
            ("prepared rows (ArrayRecord), prefetch 0", lambda: D.make_loader(pc, batch_size=a.batch, seed=0,
                                                                               shard_index=0, shard_count=1)),
            ("prepared rows (ArrayRecord), prefetch 2", lambda: D.make_loader(pc, batch_size=a.batch, seed=0,
                                                                               shard_index=0, shard_count=1,
                                                                               prefetch=2)),
            ("prepared rows, 1 of 4 processes", lambda: D.make_loader(pc, batch_size=a.batch, seed=0,
                                                                      shard_index=1, shard_count=4)),
            ("in-memory Documents (repacked per epoch)", lambda: D.make_loader(docs, batch_size=a.batch, seed=0,
                                                                               shard_index=0, shard_count=1)),
        ):
            rate, ms = loader_rate(make(), a.batches, tpb)
            rows.append((name, rate, ms))
        size = sum(s["bytes"] for s in m["shards"])
        print(f"\ncommand: RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']} python bench/input_pipeline.py "
              f"--mb {a.mb:g} --seq-len {a.seq_len} --batch {a.batch} --batches {a.batches} --shards {a.shards} "
              f"--tokenizer {a.tokenizer}")
        print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible (shared); "
              f"tokenizer {tok_name}; corpus {nbytes / 2**20:.1f} MiB jsonl, {c['documents']:,} documents, "
              f"{c['tokens']:,} tokens -> {c['rows']:,} rows of {a.seq_len} (fill {c['fill']:.1%}); "
              f"shards {size / 2**20:.1f} MiB ({m['token_dtype']})\n")
        print("| stage | tokens/s | time |")
        print("|---|---:|---:|")
        print(f"| `slayer data prepare` (tokenise + shuffle + pack + write, 1 tokenizer thread) | "
              f"{c['tokens'] / prep_s:,.0f} | {prep_s:.2f} s |")
        print(f"| in-memory `make_dataset` (tokenise only, same tokenizer) | {c['tokens'] / mem_tok_s:,.0f} | "
              f"{mem_tok_s:.2f} s |")
        for name, rate, ms in rows:
            print(f"| loader: {name}, batch {a.batch}x{a.seq_len} | {rate:,.0f} | {ms:.2f} ms/batch |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
