"""The record of how a model was made (config.json's "slayer" key): one writer
(`surgery.surgery_record`), one reader (`surgery.read_record`), and every path keeps it:
`slayer surgery`, convert to a checkpoint and back, a bf16 conversion, a training export (S
strategy and full fine-tuning), and `plan.kind=from_model`, which continues training an exported
model on exactly what its record says is trainable, without new surgery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from slayer_jax import surgery
from slayer_jax.cli import main
from slayer_jax.errors import SlayerError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "smollm2_slayer.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tiny_tok import copy_json_corpus, make_exported_model

    work = tmp_path_factory.mktemp("record")
    make_exported_model(work / "model", layers=4)
    copy_json_corpus(work / "corpus", limit=4)
    return work


def train(work: Path, name: str, model: Path, **extra) -> Path:
    o = {"model": model, "workdir": work / name, "export_dir": work / name / "hf", "steps": 2, "batch_size": 8,
         "data.source": work / "corpus", "data.seq_len": 32, "plan.expand": 1, "log_every": 1,
         "eval_every": 1000, "checkpoint.every": 1000, **extra}
    assert main(["train", "--config", CONFIG, *[f"--config.{k}={v}" for k, v in o.items()]]) == 0
    return work / name / "hf"


def weights(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def test_every_conversion_gives_back_the_surgery_record(base, tmp_path):
    out = tmp_path / "s"
    assert main(["surgery", str(base / "model"), str(out), "--plan", "shallow", "--expand", "1", "--prune", "1",
                 "--refresh-last"]) == 0
    rec = surgery.read_record(out)
    assert rec is not None and rec.plan == surgery.shallow(4, 1, 1, refresh_last=True)
    assert [r["kind"] for r in rec.layer_map] == ["original", "original", "inserted", "refreshed"]
    assert rec.trained_steps == 0 and rec.trainable_rest == {"embed": False, "norm": False, "lm_head": False}
    want = rec.to_json()
    assert json.loads((out / "config.json").read_text())["slayer"] == want  # what was written reads back whole

    assert main(["convert", str(out), str(tmp_path / "ckpt"), "--to", "checkpoint"]) == 0
    assert surgery.read_record(tmp_path / "ckpt").to_json() == want
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert surgery.read_record(tmp_path / "back").to_json() == want
    assert main(["convert", str(out), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert surgery.read_record(tmp_path / "bf16").to_json() == want
    assert surgery.read_record(base / "model") is None  # an untouched model has none


def test_training_exports_a_record_and_from_model_continues_on_it(base):
    s = train(base, "s", base / "model", **{"plan.kind": "shallow", "plan.prune": 1})
    rec = surgery.read_record(s)
    assert rec.plan == surgery.shallow(4, 1, 1) and rec.trained_steps == 2
    trainable = [r["index"] for r in rec.layer_map if r["trainable"]]
    assert trainable == [2]

    more = train(base, "more", s, **{"plan.kind": "from_model", "steps": 3})  # no new surgery
    rec2 = surgery.read_record(more)
    assert rec2.plan == rec.plan and rec2.layer_map == rec.layer_map and rec2.trained_steps == 5
    w0, w1 = weights(s), weights(more)
    assert sorted(w0) == sorted(w1)  # same layer count: nothing was inserted again
    moved = {n.split(".")[2] for n in w0 if n.startswith("model.layers.") and not np.array_equal(w0[n], w1[n])}
    assert moved == {"2"}, moved  # only the recorded trainable block trained
    assert all(np.array_equal(w0[n], w1[n]) for n in w0 if not n.startswith("model.layers."))


def test_full_finetuning_export_records_everything_trainable(base):
    ft = train(base, "ft", base / "model", **{"plan.kind": "none", "full_finetune": True})
    rec = surgery.read_record(ft)
    assert rec.plan is None and rec.trained_steps == 2
    assert all(r["trainable"] for r in rec.layer_map) and len(rec.layer_map) == 4
    assert rec.trainable_rest == {"embed": True, "norm": True, "lm_head": True}
    from slayer_jax.io.hf import load_hf

    params = load_hf(ft, progress=False)[0]
    assert all(jax.tree_util.tree_leaves(surgery.restore(params, ft)[1]))


def test_from_model_without_a_record_and_a_malformed_record_are_one_line(base, tmp_path, capsys):
    o = [f"--config.model={base / 'model'}", "--config.plan.kind=from_model", f"--config.workdir={tmp_path / 'w'}",
         f"--config.data.source={base / 'corpus'}"]
    assert main(["train", "--config", CONFIG, *o]) == 2
    assert "plan.kind is from_model but the model has no slayer record" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(base / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    for record, field in [([1], "slayer.: expected an object"),
                          ({"layer_map": [{"index": 0, "kind": "grown", "from": [0], "trainable": True}]},
                           "slayer.layer_map[0]: expected"),
                          ({"layer_map": [{"index": 0, "kind": "original", "from": [0], "trainable": True}],
                            "plan": {"num_layers": "four"}}, "slayer.plan: expected a valid plan"),
                          ({"layer_map": [{"index": 0, "kind": "original", "from": [0], "trainable": True}],
                            "trained_steps": -1}, "slayer.trained_steps: expected an integer >= 0")]:
        (bad / "config.json").write_text(json.dumps(cfg | {"slayer": record}))
        with pytest.raises(SlayerError, match=f"{bad / 'config.json'}: {field}".replace("[", r"\[").replace(
                "]", r"\]").replace(".", r"\.")):
            surgery.read_record(bad)


def test_tensorboard_keeps_evaluation_apart_from_the_step(base):
    """The step's own figures under train/, evaluations (eval_loss, an eval hook's metrics) under eval/."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    train(base, "tb", base / "model", **{"data.eval_source": base / "corpus", "eval_every": 1, "export_dir": ""})
    tags = set()
    for f in (base / "tb" / "tb").glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            tags |= {v.tag for v in Event.FromString(data[i + 12:i + 12 + n]).summary.value}
            i += 12 + n + 4
    assert {"train/loss", "train/grad_norm", "train/lr", "eval/loss"} <= tags, tags
    assert not any(t.startswith("train/eval") for t in tags), tags


def test_train_help_lists_every_config_key(capsys):
    from slayer_jax.training.configs import base_config

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    listed = {line.split()[0] for line in text.split("config keys", 1)[1].splitlines()[1:] if line.strip()}
    assert set(keys(base_config().to_dict())) == listed
