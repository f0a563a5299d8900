"""Step time of `slayer train` as 2 JAX processes x 2 CPU devices against 1 process x 4 devices,
same model, same global batch, same mesh shape (fsdp=4), run in turn (ABAB...) on this machine.

CPU only: the figure worth reading is the ratio (the cost of crossing a process boundary for the
collectives, gloo over localhost), not the absolute step time. Steps 1-2 (compilation) are
dropped; the median of the rest is reported.

    python bench/multihost_step.py [--rounds 2] [--steps 12] [--layers 4] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import multiproc as mp  # noqa: E402


def make_model(out: Path, layers: int, hidden: int) -> None:
    import torch
    from tiny_tok import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4 * 2 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(str(out))


def run(work: Path, name: str, n: int, devices: int, a) -> list[float]:
    o = {"model": work / "model", "workdir": work / name, "export_dir": "", "steps": a.steps, "batch_size": 16,
         "data.source": work / "corpus", "data.seq_len": 256, "plan.expand": 2, "log_every": 1,
         "eval_every": 100000, "checkpoint.every": 100000, "mesh": "fsdp=4"}
    shutil.rmtree(work / name, ignore_errors=True)
    procs = mp.start(mp.train_argv(str(REPO / "configs" / "smollm2_slayer.py"), o), n, devices, work / f"{name}.logs")
    codes = mp.wait(procs, 1200)
    if codes != [0] * n:
        raise SystemExit(mp.logs(work / f"{name}.logs", n))
    recs = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in recs if r["step"] > 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slayer_mh_bench_"))
    try:
        make_model(work / "model", a.layers, a.hidden)
        (work / "corpus").mkdir()
        for p in sorted(Path(json.__file__).parent.glob("*.py")):
            shutil.copy(p, work / "corpus" / p.name)
        one, two = [], []
        for r in range(a.rounds):
            one.append(statistics.median(run(work, f"one{r}", 1, 4, a)))
            two.append(statistics.median(run(work, f"two{r}", 2, 2, a)))
            print(f"round {r}: 1x4 {one[-1]:.3f} s/step, 2x2 {two[-1]:.3f} s/step", flush=True)
        print(f"\n| layout | median step (s), per round | ratio to 1 x 4 |\n|---|---|---|\n"
              f"| 1 process x 4 devices | {', '.join(f'{x:.3f}' for x in one)} | 1.00 |\n"
              f"| 2 processes x 2 devices | {', '.join(f'{x:.3f}' for x in two)} | "
              f"{statistics.median(t / o for t, o in zip(two, one)):.2f} |")
        print(f"\nmodel: {a.layers} layers, d={a.hidden}, +2 new blocks trained; global batch 16 x 256 tokens; "
              f"mesh fsdp=4; {a.steps} steps, steps 1-2 dropped")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
