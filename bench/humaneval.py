"""HumanEval pass@1 (greedy, at most 384 new tokens) for SmolLM2-135M-Instruct: our stack and transformers.

Both generate from the raw HumanEval prompt with the Codex stop sequences (\\nclass, \\ndef, \\n#,
\\nif, \\nprint) and EOS, the completion is cut at the first stop sequence, and both sets of
completions run in the same sandbox (slayer_jax.evaluation.sandbox: one process per sample). Ours runs on
all problems (or --limit); transformers on the first --hf-limit of them (its batch-1 CPU decoding
is slow), in batches of --hf-batch left-padded prompts. The completions of the two are compared
text for text on the common problems, and the problems where they differ are listed.

    python bench/humaneval.py [--limit N] [--hf-limit N] [--hf-batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--hf-limit", type=int, default=None, help="problems for transformers (default: as ours)")
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=384)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from slayer_jax.evaluation import evaluate as ev
    from slayer_jax.evaluation import sandbox
    from slayer_jax.generate import Generator
    from slayer_jax.io.assets import default_model_dir
    from slayer_jax.io.hf import load_hf

    model_dir = default_model_dir()
    problems = ev.load_humaneval()[:a.limit]
    params, cfg, tok = load_hf(model_dir, progress=False)
    out = {"model": "SmolLM2-135M-Instruct fp32", "max_new_tokens": a.max_new, "stop": list(ev.HUMANEVAL_STOP),
           "sandbox": sandbox.capabilities()["mode"], "load_avg_start": os.getloadavg()}

    # ---- ours
    gen = Generator(params, cfg, tok, max_batch=a.batch)
    t = time.perf_counter()
    comps = gen.generate([p["prompt"] for p in problems], a.max_new, stop_strings=ev.HUMANEVAL_STOP, chunk=16,
                         progress=True)
    out["ours_generate_s"] = time.perf_counter() - t
    out["ours_new_tokens"] = sum(len(c.tokens) for c in comps)
    ours = [ev.truncate_completion(c.text or "") for c in comps]
    res = ev.check_completions(problems, [[c] for c in ours], workers=2, progress=True)
    out["ours"] = ev.humaneval_summary(res, [1])
    out["ours_passed"] = [p["task_id"] for p, r in zip(problems, res) if r[0].passed]
    print(f"ours: pass@1 {out['ours']['pass@1']:.4f} on {len(problems)} problems "
          f"({out['ours_generate_s']:.0f}s, {out['ours_new_tokens']} new tokens)", file=sys.stderr)
    if a.json:  # a partial result, in case the slower transformers half is cut short
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)

    # ---- transformers
    n_hf = len(problems) if a.hf_limit is None else min(a.hf_limit, len(problems))
    if n_hf:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        htok = AutoTokenizer.from_pretrained(model_dir)
        htok.padding_side = "left"
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        sub = problems[:n_hf]
        order = sorted(range(n_hf), key=lambda i: -len(htok(sub[i]["prompt"])["input_ids"]))
        theirs: list[str] = [""] * n_hf
        new_tokens = 0
        t = time.perf_counter()
        for s in range(0, n_hf, a.hf_batch):
            idx = order[s:s + a.hf_batch]
            enc = htok([sub[i]["prompt"] for i in idx], return_tensors="pt", padding=True)
            with torch.no_grad():
                o = hf.generate(**enc, max_new_tokens=a.max_new, do_sample=False, stop_strings=list(ev.HUMANEVAL_STOP),
                                tokenizer=htok, pad_token_id=htok.eos_token_id)
            for r, i in enumerate(idx):
                row = o[r, enc["input_ids"].shape[1]:].tolist()
                new_tokens += sum(1 for x in row if x != htok.eos_token_id)
                theirs[i] = ev.truncate_completion(htok.decode(row, skip_special_tokens=True))
            print(f"transformers: {min(s + a.hf_batch, n_hf)}/{n_hf} ({time.perf_counter() - t:.0f}s)",
                  file=sys.stderr)
        out["hf_generate_s"] = time.perf_counter() - t
        out["hf_new_tokens_approx"] = new_tokens
        res_hf = ev.check_completions(sub, [[c] for c in theirs], workers=2, progress=True)
        out["hf"] = ev.humaneval_summary(res_hf, [1])
        out["hf_problems"] = n_hf
        ours_sub = ev.humaneval_summary(res[:n_hf], [1])
        out["ours_on_hf_subset"] = ours_sub
        same = [i for i in range(n_hf) if ours[i] == theirs[i]]
        out["identical_completions"] = len(same)
        out["differing"] = [{"task_id": sub[i]["task_id"], "ours_passed": res[i][0].passed,
                             "hf_passed": res_hf[i][0].passed,
                             "first_diff_char": next((j for j, (x, y) in enumerate(zip(ours[i], theirs[i])) if x != y),
                                                     min(len(ours[i]), len(theirs[i])))}
                            for i in range(n_hf) if ours[i] != theirs[i]]
        out["pass_flags_equal"] = all(res[i][0].passed == res_hf[i][0].passed for i in range(n_hf))
        print(f"transformers: pass@1 {out['hf']['pass@1']:.4f} on {n_hf}; ours on the same "
              f"{ours_sub['pass@1']:.4f}; identical completions {len(same)}/{n_hf}", file=sys.stderr)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
