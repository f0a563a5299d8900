"""The training run end to end on a tiny model with SmolLM2's real tokenizer: exact resume after a
real SIGKILL, refusal to resume into another plan, a NaN stop that keeps the last checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, smollm2_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(smollm2_dir) / f).exists():
            shutil.copy(Path(smollm2_dir) / f, work / "model" / f)
    corpus = work / "corpus"
    corpus.mkdir()
    import json as json_mod

    for p in sorted(Path(json_mod.__file__).parent.glob("*.py")):
        shutil.copy(p, corpus / p.name)
    return work


def overrides(work: Path, name: str, steps: int = 10, **extra) -> list[str]:
    o = {"model": str(work / "model"), "workdir": str(work / name), "export_dir": "", "steps": steps,
         "batch_size": 4, "data.source": str(work / "corpus"), "data.seq_len": 64, "plan.expand": 1,
         "log_every": 1, "eval_every": 1000, "checkpoint.every": 1, "checkpoint.keep": 2, **extra}
    return [f"--config.{k}={v}" for k, v in o.items()]


def losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # the last occurrence wins (steps redone after resume)
    return out


def _cli(args, **kw):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "slayer_jax.cli", "train", "--config",
                             str(REPO / "configs" / "smollm2_slayer.py"), *args], env=env, **kw)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tiny_setup):
    work = tiny_setup
    ref = _cli(overrides(work, "ref"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert ref.wait(timeout=900) == 0, ref.stderr.read().decode()[-2000:]
    reference = losses(work / "ref" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, 11))

    victim = _cli(overrides(work, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = work / "killed" / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        if victim.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = max(losses(metrics))
    assert done_before < 10, "the kill must land mid-run"

    resumed = _cli(overrides(work, "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert b"resumed from step" in out
    got = losses(metrics)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == reference[step], (step, got[step], reference[step])  # bit for bit


@pytest.mark.slow
def test_resume_into_other_plan_is_refused_and_nan_stops(tiny_setup):
    from slayer_jax import train as train_mod
    from slayer_jax.checkpoint import TrainCheckpointer
    from slayer_jax.configs import load_config_file
    from slayer_jax.errors import SlayerError

    work = tiny_setup
    cfg = load_config_file(REPO / "configs" / "smollm2_slayer.py", overrides(work, "nan", steps=2, batch_size=8,
                                                                              **{"checkpoint.async_save": False}))
    train_mod.run(cfg)
    other = load_config_file(REPO / "configs" / "smollm2_slayer.py",
                             overrides(work, "nan", steps=4, batch_size=8, **{"plan.expand": 2}))
    with pytest.raises(SlayerError, match="'layer_map'|'plan'"):
        train_mod.run(other)

    more = load_config_file(REPO / "configs" / "smollm2_slayer.py", overrides(work, "nan", steps=4, batch_size=8))
    real = train_mod.token_nll
    train_mod.token_nll = lambda logits, targets: real(logits, targets) * np.nan
    try:
        with pytest.raises(SlayerError, match=r"step 3: loss is nan.*step 2"):
            train_mod.run(more)
    finally:
        train_mod.token_nll = real
    assert TrainCheckpointer(work / "nan" / "checkpoints").latest_step() == 2
