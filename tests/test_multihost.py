"""Training as several JAX processes, as on a pod: 2 processes x 2 CPU devices on localhost, the
mesh spanning both, against 1 process x 4 devices on the same global batches.

Tolerance: the losses and parameters of 2 processes equal 1 process's to float32 rounding
(rtol 2e-5), not bit for bit: XLA reduces a sum over 4 devices with one all-reduce inside one
process but with a cross-process (gloo) all-reduce otherwise, in another order. A run resumed
after SIGKILL on the same processes is compared bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import multiproc as mp
import numpy as np
import pytest

from slayer_jax.errors import SlayerError
from slayer_jax.parallel.multihost import launch_settings

CONFIG = str(mp.REPO / "configs" / "smollm2_slayer.py")


# ----------------------------------------------------------------------------- start-up settings
def test_launch_settings_read_the_generic_environment_and_the_config():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert launch_settings(None, env) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                          "process_id": 3}
    cd = {"coordinator": "h:1", "num_processes": 2, "process_id": 0}
    assert launch_settings(cd, env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
    assert launch_settings(None, {}) is None
    assert launch_settings(None, {"SLURM_NTASKS": "1"}) is None
    assert launch_settings(None, {"SLURM_NTASKS": "8"}) == {}  # JAX's SLURM detection
    assert launch_settings(None, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}  # Cloud TPU metadata
    assert launch_settings(None, {"SLAYER_MULTIHOST": "1"}) == {}  # launch/tpu_vm.sh: JAX reads the TPU VM metadata


@pytest.mark.parametrize("cd,env,line", [
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1"},
     "environment variable JAX_NUM_PROCESSES is not set; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID "
     "go together"),
    (None, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "environment variable JAX_COORDINATOR_ADDRESS is not set"),
    (None, {"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "environment variable JAX_COORDINATOR_ADDRESS is 'h'; expected HOST:PORT"),
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "environment variable JAX_PROCESS_ID is 2; expected 0..1"),
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "environment variable JAX_NUM_PROCESSES is 'two'; expected an integer >= 1"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": -1}, {},
     "config key 'distributed.num_processes' is not set"),
    (None, {"SLURM_NTASKS": "many"}, "environment variable SLURM_NTASKS is 'many'"),
])
def test_a_partial_or_wrong_launch_setting_is_one_line(cd, env, line):
    with pytest.raises(SlayerError) as e:
        launch_settings(cd, env)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_partial_environment_through_the_cli_exits_2_without_a_traceback(tmp_path):
    import subprocess
    import sys

    env = mp.env_for(0, 1, 1, 0, JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
    r = subprocess.run([sys.executable, *mp.train_argv(CONFIG, {"workdir": tmp_path / "w"})], env=env,
                       capture_output=True, text=True, timeout=300, cwd=mp.REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "environment variable JAX_NUM_PROCESSES is not set" in r.stderr
    assert not (tmp_path / "w").exists()


FAILING_CHILD = r"""
import sys
import jax
import jax.numpy as jnp
from slayer_jax.errors import SlayerError
from slayer_jax.parallel import multihost

assert multihost.initialize()
try:
    if sys.argv[1] == "together":  # process 0 alone fails inside a block
        with multihost.together("writing the logs"):
            if jax.process_index() == 0:
                raise OSError(28, "No space left on device")
    else:  # an export whose directory process 0 cannot create, of weights sharded over both processes
        from slayer_jax.modeling.config import ModelConfig
        from slayer_jax.io.hf import save_hf
        from slayer_jax.modeling.model import init_params
        from slayer_jax.parallel.sharding import make_mesh, param_shardings

        cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8)
        params = init_params(cfg, 2, jax.random.PRNGKey(0))
        params = jax.device_put(params, param_shardings(params, make_mesh("fsdp=4")))
        save_hf(params, cfg, sys.argv[2], progress=False)
    print("NO ERROR", flush=True)
except SlayerError as e:
    print(f"ERROR {e}", flush=True)
    sys.exit(2)
"""


@pytest.mark.parametrize("mode", ["together", "export"])
def test_a_failure_on_process_0_alone_stops_every_process_with_its_line(tmp_path, mode):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    procs = mp.start(["-c", FAILING_CHILD, mode, str(blocker / "export")], 2, 2, tmp_path / "logs")
    codes = mp.wait(procs, 240)  # a process left waiting at a collective would time out here
    out = [(tmp_path / "logs" / f"proc{i}.log").read_text() for i in range(2)]
    assert codes == [2, 2], out
    want = "writing the logs: OSError: [Errno 28] No space left on device" if mode == "together" else (
        f"export {blocker / 'export'}: ")
    assert f"ERROR {want}" in out[0], out[0]
    assert f"ERROR process 0: {want}" in out[1], out[1]
    assert all("Traceback" not in o for o in out)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_tok import copy_json_corpus, make_exported_model

    work = tmp_path_factory.mktemp("multihost")
    make_exported_model(work / "model", layers=4)
    copy_json_corpus(work / "corpus", limit=6)
    return work


def overrides(work: Path, name: str, mesh: str, steps: int = 6, **extra) -> dict:
    return {"model": work / "model", "workdir": work / name, "export_dir": work / name / "hf", "steps": steps,
            "batch_size": 8, "data.source": work / "corpus", "data.seq_len": 64, "plan.expand": 1, "log_every": 1,
            "eval_every": 1000, "checkpoint.every": 2, "checkpoint.keep": 2, "mesh": mesh, **extra}


def train(work: Path, name: str, n: int, devices: int, mesh: str, timeout: float = 600, **extra):
    procs = mp.start(mp.train_argv(CONFIG, overrides(work, name, mesh, **extra)), n, devices, work / f"{name}.logs")
    codes = mp.wait(procs, timeout)
    assert codes == [0] * n, mp.logs(work / f"{name}.logs", n)
    return work / name


def records(workdir: Path) -> dict[int, dict]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r  # the last occurrence wins (steps redone after a resume)
    return out


def weights(export: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(export / "model.safetensors"))


@pytest.fixture(scope="module")
def prepared(setup):
    """The corpus packed once by `slayer data prepare` into 3 ArrayRecord shards."""
    import subprocess
    import sys

    out = setup / "prepared"
    r = subprocess.run([sys.executable, "-m", "slayer_jax.cli", "data", "prepare", str(setup / "corpus"), "--tokenizer",
                        str(setup / "model"), "--out", str(out), "--seq-len", "64", "--shards", "3", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=mp.REPO, env=mp.env_for(0, 1, 1, 0))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def one_process(setup):
    return {"memory": train(setup, "one", 1, 4, "fsdp=4")}


@pytest.mark.slow
@pytest.mark.parametrize("mesh,source", [("fsdp=4", "memory"), ("data=2,fsdp=2", "memory"), ("fsdp=4", "prepared")])
def test_two_processes_train_as_one(setup, one_process, request, mesh, source):
    extra = {}
    if source == "prepared":  # streamed: each process reads only its rows of each global batch
        extra = {"data.source": request.getfixturevalue("prepared")}
        if source not in one_process:
            one_process[source] = train(setup, "one_prepared", 1, 4, "fsdp=4", **extra)
    two = train(setup, f"two_{mesh.replace(',', '_').replace('=', '')}_{source}", 2, 2, mesh, **extra)
    ref, got = records(one_process[source]), records(two)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for s in ref:
        for k in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(got[s][k], ref[s][k], rtol=2e-5, err_msg=f"step {s} {k}")
    w_ref, w_got = weights(one_process[source] / "hf"), weights(two / "hf")
    assert sorted(w_got) == sorted(w_ref)
    moved = 0
    for name in w_ref:
        np.testing.assert_allclose(w_got[name], w_ref[name], rtol=2e-5, atol=1e-7, err_msg=name)
    base = weights(setup / "model")
    moved = sum(not np.array_equal(w_ref[n], base[n]) for n in base if n in w_ref and w_ref[n].shape == base[n].shape)
    assert moved > 0  # training changed the new block (the comparison is not of two untouched copies)
    # process 1 wrote neither metrics nor TensorBoard logs twice: one line per step
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 6
    # each process saved its own data iterator state
    assert sorted(p.name for p in (two / "checkpoints" / "6" / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_processes_export_loads_in_transformers_with_the_same_logits(setup):
    import torch
    from transformers import AutoModelForCausalLM

    from slayer_jax.io.hf import load_hf
    from slayer_jax.modeling.model import forward

    two = setup / "two_fsdp4_memory" / "hf"
    if not two.exists():
        train(setup, "two_fsdp4_memory", 2, 2, "fsdp=4")
    params, cfg, tok = load_hf(two, progress=False)
    ids = np.asarray([tok("def load(path):\n    return json.loads(path.read_text())")["input_ids"]])
    ours = np.asarray(forward(params, ids, cfg))
    hf = AutoModelForCausalLM.from_pretrained(str(two), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    assert cfg and len(params["layers"]) == 5
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


RESUME_STEPS = 24  # long enough that the SIGTERM notice, which takes a moment to reach every process, lands mid-run


@pytest.fixture(scope="module")
def uninterrupted(setup):
    return train(setup, "uninterrupted", 2, 2, "fsdp=4", steps=RESUME_STEPS)


def assert_same_run(ref: Path, resumed: Path, steps: int) -> None:
    a, b = records(ref), records(resumed)
    assert sorted(b) == list(range(1, steps + 1))
    lines = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, steps + 1))  # the steps after the restored checkpoint were dropped, then redone
    for s in range(1, steps + 1):
        assert b[s]["loss"] == a[s]["loss"] and b[s]["grad_norm"] == a[s]["grad_norm"], s
    w_a, w_b = weights(ref / "hf"), weights(resumed / "hf")
    for n in w_a:
        assert np.array_equal(w_a[n], w_b[n]), n


@pytest.mark.slow
def test_sigterm_to_one_process_saves_at_one_step_on_both_exits_0_and_resumes_bit_for_bit(setup, uninterrupted):
    """A preemption notice reaches one host: JAX's preemption sync service spreads it, both
    processes save the same step and exit 0. Regular checkpoints are off (every 1000 steps)."""
    import os
    import signal

    steps, name = RESUME_STEPS, "sigterm"
    o = overrides(setup, name, "fsdp=4", steps=steps, **{"checkpoint.every": 1000})
    procs = mp.start(mp.train_argv(CONFIG, o), 2, 2, setup / f"{name}.logs")
    metrics = setup / name / "metrics.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            if any(p.poll() is not None for p in procs):
                pytest.fail("training ended before the signal:\n" + mp.logs(setup / f"{name}.logs", 2))
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)  # process 1 only
        codes = mp.wait(procs, 300)
    finally:
        mp.kill(procs)
    text = mp.logs(setup / f"{name}.logs", 2)
    assert codes == [0, 0], text
    assert "Traceback" not in text
    saved = [p.name for p in (setup / name / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 2 <= int(saved[0]) < steps, (saved, text)
    at = int(saved[0])
    assert sorted(p.name for p in (setup / name / "checkpoints" / saved[0] / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert f"slayer: preempted (SIGTERM) at step {at} of {steps}" in text
    assert json.loads((setup / name / "run_status.json").read_text()) == {"state": "preempted", "step": at,
                                                                          "steps": steps}
    assert max(records(setup / name)) == at and not (setup / name / "hf").exists()
    resumed = train(setup, name, 2, 2, "fsdp=4", steps=steps, **{"checkpoint.every": 1000})
    assert f"resumed from step {at}" in (setup / f"{name}.logs" / "proc0.log").read_text()
    assert_same_run(uninterrupted, resumed, steps)
    assert json.loads((resumed / "run_status.json").read_text())["state"] == "complete"


@pytest.mark.slow
def test_sigkill_both_processes_and_resume_bit_for_bit(setup, uninterrupted):
    steps = RESUME_STEPS
    ref = uninterrupted
    name = "killed"
    o = overrides(setup, name, "fsdp=4", steps=steps)
    procs = mp.start(mp.train_argv(CONFIG, o), 2, 2, setup / f"{name}.logs")
    metrics = setup / name / "metrics.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                break
            if any(p.poll() is not None for p in procs):
                pytest.fail("training ended before it could be killed:\n" + mp.logs(setup / f"{name}.logs", 2))
            time.sleep(0.05)
    finally:
        mp.kill(procs)  # SIGKILL to both process groups
    done = len(metrics.read_text().splitlines())
    assert done < steps
    assert done >= 5
    resumed = train(setup, name, 2, 2, "fsdp=4", steps=steps)
    log0 = (setup / f"{name}.logs" / "proc0.log").read_text()
    assert "resuming from it" in log0 and "resumed from step" in log0
    assert_same_run(ref, resumed, steps)


@pytest.mark.slow
def test_one_workdir_per_process_is_refused_at_start_not_a_hang(setup):
    name = "split"
    port = mp.free_port()
    import subprocess
    import sys

    procs = []
    for i in range(2):  # what TPU workers' own disks give: the same path, different filesystems
        o = overrides(setup, f"{name}/host{i}", "fsdp=4")
        log = open(setup / f"{name}_proc{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *mp.train_argv(CONFIG, o)], env=mp.env_for(i, 2, 2, port),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=mp.REPO, start_new_session=True))
    t0 = time.time()
    codes = mp.wait(procs, 300)
    out = [(setup / f"{name}_proc{i}.log").read_text() for i in range(2)]
    assert codes == [2, 2], out
    for text in out:
        assert "Traceback" not in text
        assert "processes [1] of 2 cannot see what process 0 wrote there" in text
    assert time.time() - t0 < 300
    assert not any((setup / name / f"host{i}" / "checkpoints").exists() for i in range(2))
