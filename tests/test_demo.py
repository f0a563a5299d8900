"""`slayer demo` end to end on the real SmolLM2 with a tiny step count."""

import json
import math

import numpy as np
import pytest


@pytest.mark.slow
def test_demo_end_to_end(smollm2_dir, tmp_path):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from slayer_jax.demo import run_demo
    from slayer_jax.io.hf import load_hf
    from slayer_jax.modeling.model import forward

    out = tmp_path / "demo"
    assert run_demo(out=str(out), steps=2, importance_windows=1, eval_windows=1, mcq_limit=8) == 0
    for name in ("report.md", "results.json", "loss.png", "curves.png", "domain_vs_forgetting.png",
                 "importance/importance.csv", "data/probe/train.jsonl",
                 "importance/importance.json", "importance/recommended_plan.json"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    plan = res["plan"]
    assert plan["num_layers"] == 30
    n_layers = 30 + len(plan["expand_after"]) - len(plan["prune"])
    run = res["results"][0]
    assert run["num_layers"] == n_layers
    for metrics in (res["base"], run["final"]):
        for k in ("code_ppl", "english_ppl", "mcq_acc"):
            assert math.isfinite(metrics[k]), k
    assert 1.0 < res["base"]["english_ppl"] < 100 and 1.0 < res["base"]["code_ppl"] < 100
    # recall and forgetting: the base model is at KL 0 from itself; two steps of training move it
    assert res["base"]["kl"] == 0.0 and run["final"]["kl"] > 0.0
    for metrics in (res["base"], run["final"]):
        n = res["probe_n"]
        for k in ("recall_heldout", "recall_train"):  # multiple choice over n questions: a multiple of 1/n
            assert 0.0 <= metrics[k] <= 1.0 and abs(metrics[k] * n - round(metrics[k] * n)) < 1e-9, k
    assert [c["step"] for c in run["curve"]] == [0, 1, 2]  # base, one evaluation during training, the final
    # the first step runs at learning rate 0 (warmup): nothing changed yet, and KL is exactly 0
    assert run["history"][1]["lr"] == 0.0 and run["curve"][1]["kl"] == 0.0
    assert run["curve"][1]["code_nll"] == res["base"]["code_nll"]
    assert run["curve"][-1] == {"step": 2, **run["final"]}
    assert run["trainable"] < 0.5 * run["total_params"]
    report = (out / "report.md").read_text()
    assert "| base |" in report and "slayer" in report and "Stage timings" in report
    # the export reloads in transformers with the same logits as our JAX model
    export = run["export_dir"]
    params, cfg, tok = load_hf(export, progress=False)
    assert len(params["layers"]) == n_layers
    ids = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    ours = np.asarray(forward(params, jnp.asarray([ids]), cfg))
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-3
