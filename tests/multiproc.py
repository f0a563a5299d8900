"""Launch N JAX processes on localhost (D simulated CPU devices each) as a pod would: one
coordinator, the generic JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment, cross-process collectives by JAX's CPU backend. Every wait has a timeout and a
timed-out group is killed, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(process_id: int, num_processes: int, devices: int, port: int, **extra) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id), SLAYER_INIT_TIMEOUT="120")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(argv: list[str], num_processes: int, devices: int, logdir: Path, **extra) -> list[subprocess.Popen]:
    """Start ``python argv`` once per process; stdout+stderr of process i go to logdir/proc{i}.log."""
    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(num_processes):
        log = open(logdir / f"proc{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env_for(i, num_processes, devices, port, **extra),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
        log.close()
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; kills every process and raises TimeoutError when any is still running after ``timeout``."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill(procs)
            raise TimeoutError(f"processes still running after {timeout:.0f} s: killed") from None
    return [p.returncode for p in procs]


def logs(logdir: Path, n: int) -> str:
    return "\n".join(f"--- proc{i} ---\n{(logdir / f'proc{i}.log').read_text()[-3000:]}" for i in range(n))


def train_argv(config: str, overrides: dict) -> list[str]:
    return ["-m", "slayer_jax.cli", "train", "--config", config, *[f"--config.{k}={v}" for k, v in overrides.items()]]
