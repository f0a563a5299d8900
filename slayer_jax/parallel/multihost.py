"""Several JAX processes (multi-controller SPMD): start-up, global batches, values every process can read.

One process per host (TPU VM worker, GPU node or SLURM task) runs the same program; the mesh
spans every device of every process. This module holds what that needs beyond one process:

- :func:`initialize`: ``jax.distributed.initialize`` from the config's ``distributed`` block, a
  generic environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
  SLURM or Cloud TPU metadata (JAX's own cluster detection), with a one-line error for a partial
  or wrong setting;
- :func:`local_rows` and :func:`global_batch`: every process reads the same global batch order
  and feeds only the rows its devices hold (``jax.make_array_from_process_local_data``), so a run
  gives the same batches whatever the number of processes;
- :func:`require_shared_dir`: a workdir every process can see (shared disk or gs://), refused at
  start, on every process, when it is not, instead of a checkpoint save that waits forever;
- :func:`replicated_value`: a replicated result as a host array on every process;
- :class:`PreemptionNotice`: SIGTERM (a preempted Cloud TPU VM, a SLURM requeue) as a request to
  save at a step every process agrees on.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from slayer_jax.errors import SlayerError
from slayer_jax.storage import as_path

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int(value: Any, what: str, lo: int) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        out = lo - 1
    if out < lo:
        raise SlayerError(f"{what} is {value!r}; expected an integer >= {lo}")
    return out


def _address(value: str, what: str) -> str:
    host, _, port = str(value).strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SlayerError(f"{what} is {value!r}; expected HOST:PORT of process 0 (e.g. 10.0.0.2:8476)")
    return f"{host}:{port}"


def launch_settings(cd: Mapping | None = None, env: Mapping[str, str] | None = None) -> dict | None:
    """The ``jax.distributed.initialize`` arguments this launch asks for; ``{}`` = let JAX detect
    the cluster (SLURM, Cloud TPU pod); ``None`` = one process. Raises a one-line SlayerError for a
    partial or malformed setting."""
    env = os.environ if env is None else env
    cd = dict(cd or {})
    keys = ("coordinator", "num_processes", "process_id")
    if cd.get("coordinator") or int(cd.get("num_processes", 0) or 0) or int(cd.get("process_id", -1)) >= 0:
        names = {k: f"config key 'distributed.{k}'" for k in keys}
        values = {k: cd.get(k) for k in keys}
        unset = {"coordinator": "", "num_processes": 0, "process_id": -1}
        missing = [k for k in keys if values[k] in (None, unset[k])]
        together = "distributed.coordinator, distributed.num_processes and distributed.process_id go together"
    elif any(env.get(k) for k in ENV):
        names = {k: f"environment variable {e}" for k, e in zip(keys, ENV)}
        values = {k: env.get(e) for k, e in zip(keys, ENV)}
        missing = [k for k in keys if not values[k]]
        together = f"{', '.join(ENV)} go together (or use SLURM / Cloud TPU, which JAX detects itself)"
    elif (env.get("SLAYER_MULTIHOST") == "1"
          or _int(env.get("SLURM_NTASKS") or 1, "environment variable SLURM_NTASKS", 1) > 1
          or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
          or _on_cloud_tpu_vm(env)):
        return {}  # JAX's own cluster detection: SLURM, Cloud TPU metadata
    else:
        return None
    if missing:
        raise SlayerError(f"{names[missing[0]]} is not set; {together}")
    n = _int(values["num_processes"], names["num_processes"], 1)
    i = _int(values["process_id"], names["process_id"], 0)
    if i >= n:
        raise SlayerError(f"{names['process_id']} is {i}; expected 0..{n - 1} (the number of processes is {n})")
    return {"coordinator_address": _address(values["coordinator"], names["coordinator"]),
            "num_processes": n, "process_id": i}


def _on_cloud_tpu_vm(env: Mapping[str, str]) -> bool:
    """A Cloud TPU VM (its TPU chips are /dev/accel* or /dev/vfio devices): JAX reads the slice's
    hosts from the VM's metadata server, so ``jax.distributed.initialize()`` needs no argument
    (on a single-host slice it sets up one process). ``SLAYER_TPU_VM=0`` turns the probe off."""
    if env.get("SLAYER_TPU_VM") == "0" or env.get("JAX_PLATFORMS", "") == "cpu":
        return False

    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize(cd: Mapping | None = None) -> bool:
    """Join the other processes (before any JAX computation). Returns True when there are several."""
    settings = launch_settings(cd)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    timeout = _int(os.environ.get("SLAYER_INIT_TIMEOUT", "300"), "environment variable SLAYER_INIT_TIMEOUT", 1)
    try:
        jax.distributed.initialize(**settings, initialization_timeout=timeout)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlayerError(f"jax.distributed.initialize({', '.join(f'{k}={v}' for k, v in settings.items())}) "
                          f"failed: {first}") from None
    return jax.process_count() > 1


def local_rows(sharding: jax.sharding.Sharding, global_rows: int) -> slice:
    """The contiguous rows of a ``[global_rows, ...]`` batch that this process's devices hold.

    Checked for every process from the global device map (the same on all), so a mesh that does
    not give each process one contiguous block is refused by every process alike."""
    rows: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((global_rows,)).items():
        sl = index[0]
        rows.setdefault(device.process_index, set()).add((sl.start or 0, global_rows if sl.stop is None else sl.stop))
    if jax.process_index() not in rows:
        raise SlayerError(f"mesh: process {jax.process_index()} holds no device of the mesh; with several processes the "
                          f"mesh must span every device (num_devices=0)")
    blocks = {}
    for proc, spans in sorted(rows.items()):
        spans = sorted(spans)
        lo, hi = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != hi - lo or any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
            raise SlayerError(f"mesh: process {proc}'s devices hold rows {spans} of the batch, not one contiguous "
                              f"block; order the mesh devices by process")
        blocks[proc] = slice(lo, hi)
    return blocks[jax.process_index()]


def global_batch(rows: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                 global_rows: int) -> dict[str, jax.Array]:
    """One global ``[global_rows, ...]`` array per field. ``rows`` is either the whole global batch
    (each process then hands over only its own rows) or just this process's rows, as
    :func:`local_rows` names them."""
    mine = local_rows(sharding, global_rows)
    out = {}
    for k, v in rows.items():
        if v.shape[0] == global_rows:
            v = v[mine]
        elif v.shape[0] != mine.stop - mine.start:
            raise ValueError(f"batch field {k!r} has {v.shape[0]} rows; expected the global batch ({global_rows}) "
                             f"or this process's rows {mine.start}:{mine.stop}")
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_rows, *v.shape[1:]))
    return out


def replicated_value(x: jax.Array) -> np.ndarray:
    """A replicated (or single-process) result as a host array, on every process: no transfer
    between processes (``device_get`` refuses arrays that span other processes' devices)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"array of shape {x.shape} is sharded over other processes' devices; gather it first")
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


MESSAGE_BYTES = 2048


def agree(error: str | None) -> None:
    """Collective: every process passes its own error (or None); if any has one, every process
    raises the same one-line SlayerError, so no process is left waiting at the next collective.
    It is also a barrier."""
    if jax.process_count() == 1:
        if error is not None:
            raise SlayerError(error)
        return

    text = (error or "").encode("utf-8", "replace")[:MESSAGE_BYTES]
    buf = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    buf[0] = error is not None
    buf[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buf))
    failed = [i for i in range(every.shape[0]) if every[i, 0]]
    if failed:
        first = bytes(every[failed[0], 1:]).rstrip(b"\0").decode("utf-8", "replace")
        raise SlayerError(first if failed[0] == jax.process_index() else f"process {failed[0]}: {first}")


@contextlib.contextmanager
def together(what: str):
    """Run the block on this process (it may be process-0-only work, such as writing a log), then
    :func:`agree`: an error in the block on any process is raised on every process, as one line
    (``what: error``), instead of killing one process while the others wait."""
    error = None
    try:
        yield
    except SlayerError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 -- turned into one line on every process
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        error = f"{what}: {type(e).__name__}{': ' + first if first else ''}"
    agree(error)


def require_shared_dir(path, what: str = "workdir") -> None:
    """Every process must see the same ``path`` (checkpoints are written by all processes into one
    directory). Process 0 writes a token, every process looks for it, and all agree before any
    raises, so none is left waiting at a barrier."""

    path = as_path(path)
    if jax.process_count() == 1:
        return

    token = int(multihost_utils.broadcast_one_to_all(np.int64(np.random.SeedSequence().entropy % (2**62))))
    probe = path / f".shared-check-{token}"
    with together(f"{what} {path}"):
        if jax.process_index() == 0:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text(str(token))
    try:
        seen = probe.exists() and probe.read_text() == str(token)
    except OSError:
        seen = False
    seen_all = np.asarray(multihost_utils.process_allgather(np.int32(seen)))
    multihost_utils.sync_global_devices(f"slayer-shared-dir-done-{token}")
    if jax.process_index() == 0:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    if not seen_all.all():
        blind = [int(i) for i in np.flatnonzero(seen_all == 0)]
        raise SlayerError(f"{what} {path}: processes {blind} of {jax.process_count()} cannot see what process 0 wrote "
                          f"there; every process writes one checkpoint, so it must be a shared filesystem or gs://")


class PreemptionNotice:
    """SIGTERM as a preemption notice: :meth:`reached` turns True at one step, the same on every
    process, at which the caller saves and stops.

    Several processes: JAX's preemption sync service (``jax.distributed`` catches SIGTERM on any
    process, spreads the notice and picks the first step every process can still reach;
    :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`). One process: a SIGTERM
    handler sets a flag, and the step after it is the one; the previous handler is put back on
    :meth:`close`. Outside the main thread (where no handler can be installed) one process never
    reaches it."""

    def __init__(self):

        self.received = False
        self._previous = None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """Call at every step, from the same first step on every process."""
        if not self.multi:
            return self.received

        return bool(multihost_utils.reached_preemption_sync_point(step))

    def close(self) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
