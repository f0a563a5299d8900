"""Decode throughput on SmolLM2-135M-Instruct (fp32, CPU): our KV-cache loop against transformers `generate`.

Both run in this one process, interleaved round by round (ours B=1, transformers B=1, ours B=8,
transformers B=8, ...), so that the load other jobs put on a shared machine hits both alike; the
figure is the median over rounds. A round generates exactly 128 new tokens per row from the same
prompt (EOS does not stop either side), timing the whole call (prefill + decode). Our first call
per batch size compiles; its time is reported separately and excluded. The greedy tokens of the
two are compared as a sanity check.

    python bench/decode.py [--rounds 3] [--new 128] [--batches 1,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]

    from slayer_jax.generate import Generator
    from slayer_jax.io.assets import default_model_dir
    from slayer_jax.io.hf import load_hf

    model_dir = default_model_dir()
    params, cfg, tok = load_hf(model_dir, progress=False)
    prompt = "The history of the printing press begins in the fifteenth century, when"
    ids = tok(prompt)["input_ids"]
    gen = Generator(params, cfg, tok)

    hf = None
    if not a.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ours(B):
        t = time.perf_counter()
        outs = gen.generate_ids([ids] * B, a.new, stop_ids=())
        dt = time.perf_counter() - t
        assert all(len(o.tokens) == a.new for o in outs)
        return dt, outs[0].tokens

    def theirs(B):
        import torch

        x = torch.tensor([ids] * B)
        with torch.no_grad():
            t = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new, min_new_tokens=a.new,
                              do_sample=False, pad_token_id=tok.eos_token_id)
            dt = time.perf_counter() - t
        assert out.shape[1] - len(ids) == a.new
        return dt, out[0, len(ids):].tolist()

    res = {"model": "SmolLM2-135M-Instruct fp32", "new_tokens": a.new, "prompt_tokens": len(ids),
           "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if hf is not None:
        import torch

        res["torch_threads"] = torch.get_num_threads()
    compile_s = {}
    for B in batches:  # compile (and warm transformers) once per batch size
        t = time.perf_counter()
        ours(B)
        compile_s[B] = time.perf_counter() - t
        if hf is not None:
            theirs(B)
    times = {("ours", B): [] for B in batches}
    times.update({("hf", B): [] for B in batches})
    toks = {}
    for r in range(a.rounds):
        for B in batches:
            dt, toks[("ours", B)] = ours(B)
            times[("ours", B)].append(dt)
            if hf is not None:
                dt, toks[("hf", B)] = theirs(B)
                times[("hf", B)].append(dt)
            print(f"round {r} B={B}: " + "  ".join(f"{k[0]} {B * a.new / times[k][-1]:.1f} tok/s"
                                                    for k in times if k[1] == B and times[k]), file=sys.stderr)
    res["load_avg_end"] = os.getloadavg()
    for B in batches:
        row = {"ours_tok_s": B * a.new / statistics.median(times[("ours", B)]),
               "ours_compile_first_call_s": compile_s[B], "ours_times_s": times[("ours", B)]}
        if hf is not None:
            row["hf_tok_s"] = B * a.new / statistics.median(times[("hf", B)])
            row["hf_times_s"] = times[("hf", B)]
            row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
            a_, b_ = toks[("ours", B)], toks[("hf", B)]
            row["greedy_tokens_equal_prefix"] = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x != y), len(a_))
        res[f"batch_{B}"] = row
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
