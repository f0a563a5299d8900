"""Run untrusted Python (model-written code) in a contained child process: one process per sample.

What a sample gets (full isolation, the default where the machine allows it; see
:func:`capabilities` and docs/evaluation.md):

- a fresh temporary working directory (its own, removed afterwards), and TMPDIR/HOME pointing there;
- new PID, mount and network namespaces (``unshare --pid --fork --mount --net``): it sees only its
  own processes, cannot signal anything outside (the evaluator is not in its PID namespace), and
  has only a loopback interface that is down, so no socket reaches anything;
- when we run as root: an unprivileged uid/gid of its own (fresh per sample, no supplementary
  groups, no capabilities, ``no_new_privs``), and every mount read-only except its directory;
- rlimits: CPU seconds, address space, processes (RLIMIT_NPROC, which binds because the uid is
  not root and is unique to the sample), file size, open files, no core dumps;
- a wall-clock timeout after which the whole process group is SIGKILLed; the namespace's init is
  our supervisor, so when it dies the kernel kills every process left in the namespace, including
  ones that called setsid() or double-forked. Any process still running with the sample's uid is
  killed as well.

The supervisor (``_SUPERVISOR`` below) is our own code: it runs as root inside the namespaces, sets
up the mounts, forks the sample with the limits and the uid applied, reaps, and exits with the
sample's status. Without ``unshare`` (or without root) the sample still gets its own directory,
process group, rlimits and wall timeout, but not the namespaces: :func:`capabilities` says which.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_CAPS: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sample limits. ``memory_bytes`` is RLIMIT_AS (address space) of each process."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    nproc: int = 16
    file_bytes: int = 16 << 20
    open_files: int = 64
    output_bytes: int = 64 << 10  # stdout/stderr kept (each), the rest is dropped


@dataclasses.dataclass
class Result:
    """status: "passed" (exit 0), "failed" (non-zero exit / exception), "timeout" (wall clock),
    "killed" (a signal: CPU limit, out of memory, file size), or "error" (the sandbox itself failed)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------- the supervisor
# Runs as `python -I -S -c _SUPERVISOR <json>` (as pid 1 of the new PID namespace when unshare works).
_SUPERVISOR = r"""
import ctypes, json, os, resource, signal, sys
a = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
def mount(src, tgt, fs, flags, data=None):
    r = libc.mount(src, tgt.encode() if tgt else None, fs, ctypes.c_ulong(flags), data)
    if r != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), tgt)
work = a["work"]
if a["readonly"]:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # the interpreter lives under a directory the sample's uid cannot traverse (e.g. /root): hide that
    # directory behind an empty tmpfs and bind the interpreter's prefix back at the same path
    for i, (blocked, prefix) in enumerate(a["expose"]):
        stage = "%s/stage%d" % (a["stage"], i)
        os.makedirs(stage, exist_ok=True)
        mount(prefix.encode(), stage, None, MS_BIND | MS_REC)
        mount(b"tmpfs", blocked, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m")
        os.makedirs(prefix, exist_ok=True)
        mount(stage.encode(), prefix, None, MS_BIND | MS_REC)
    mount(work.encode(), work, None, MS_BIND)
    mps = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp != work:
                mps.append(mp)
    st_map = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
              4096: MS_RELATIME}
    for mp in mps:
        try:
            keep = os.statvfs(mp).f_flag
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for st, ms in st_map.items():
                if keep & st:
                    flags |= ms
            mount(None, mp, None, flags)
        except OSError:
            pass  # a mount we cannot see or remount (e.g. under /proc); the uid still cannot write it
pid = os.fork()
if pid == 0:
    try:
        os.chdir(work)
        for res, v in a["rlimits"]:
            resource.setrlimit(getattr(resource, res), (v, v))
        if a["uid"] is not None:
            os.setgroups([])
            os.setresgid(a["uid"], a["uid"], a["uid"])
            os.setresuid(a["uid"], a["uid"], a["uid"])
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        os.execve(a["python"], [a["python"], "-I", "-S", "-B", a["prog"]], a["env"])
    except BaseException as e:
        os.write(2, ("sandbox: could not start the sample: %r\n" % (e,)).encode())
    os._exit(127)
status = None
while True:  # reap everything (orphans are re-parented to us as pid 1) until the sample has exited
    try:
        p, st = os.wait()
    except ChildProcessError:
        break
    if p == pid:
        status = st
        break
if status is None:
    sys.exit(126)
if os.WIFSIGNALED(status):
    sys.exit(128 + os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def _try(cmd: list[str], timeout: float = 20.0) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _detect() -> dict[str, Any]:
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    ns_root = bool(unshare) and root and _try([unshare, "--net", "--pid", "--fork", "--mount", "--mount-proc",
                                               "--kill-child", "true"])
    ns_user = (bool(unshare) and not ns_root and
               _try([unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount", "--mount-proc",
                     "--kill-child", "true"]))
    mode = "namespaces+uid" if ns_root else ("userns" if ns_user else ("uid" if root else "rlimits"))
    return {
        "mode": mode,
        "unshare": unshare,
        "root": root,
        "pid_namespace": ns_root or ns_user,
        "net_namespace": ns_root or ns_user,
        "mount_namespace": ns_root or ns_user,
        "readonly_root": ns_root or ns_user,
        "separate_uid": root,
        # RLIMIT_NPROC binds only for a non-root uid; it counts every process of that uid, so it is
        # tight only when the uid is fresh (root mode) and loose (current count + nproc) otherwise.
        "nproc_binds": root or os.geteuid() != 0,
    }


def capabilities(refresh: bool = False) -> dict[str, Any]:
    """What this machine lets the sandbox do (probed once with harmless ``unshare ... true`` runs)."""
    global _CAPS
    with _LOCK:
        if _CAPS is None or refresh:
            _CAPS = _detect()
        return dict(_CAPS)


def _blocked_ancestor(path: str) -> str | None:
    """The top-most ancestor directory of ``path`` that others may not traverse (no o+x), or None."""
    parts = Path(path).resolve().parts
    for i in range(2, len(parts) + 1):
        d = Path(*parts[:i])
        try:
            if d.is_dir() and not d.stat().st_mode & 0o001:
                return str(d)
        except OSError:
            return str(d)
    return None


def _interpreter() -> tuple[str, str]:
    """(python binary, its installation prefix): the base interpreter, outside any virtualenv."""
    exe = os.path.realpath(sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _workdir_parent() -> str:
    """A temporary directory every uid can reach (the sample's own directory is made inside it)."""
    for d in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and _blocked_ancestor(os.path.join(d, "x")) is None and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def _fresh_uid() -> int:
    """A uid no account uses, fresh per sample (so RLIMIT_NPROC and the final sweep see only this sample)."""
    return 1_000_000_000 + secrets.randbelow(1_000_000_000)


def _pids_of_uid(uid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                out.append(int(d))
                            break
            except OSError:
                continue
    return out


def _sweep_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process whose real uid is ``uid`` until none is left (a fresh uid: only the sample's)."""
    for _ in range(rounds):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _count_uid_procs(uid: int) -> int:
    return len(_pids_of_uid(uid))


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    s = data[:limit].decode("utf-8", "replace")
    return s + ("\n[... output cut]" if len(data) > limit else "")


def run_python(code: str, limits: Limits = Limits(), isolation: str = "auto") -> Result:
    """Run ``code`` as a Python program in the sandbox; never raises for anything the code does.

    isolation: "auto" (the most this machine allows, see :func:`capabilities`), "none" (own
    directory, process group, rlimits and timeout only; for machines without namespaces).
    """
    caps = capabilities()
    mode = caps["mode"] if isolation == "auto" else "rlimits"
    host_dir = Path(tempfile.mkdtemp(prefix="slayer-sbx-host-"))  # ours: program text and output files
    work = Path(tempfile.mkdtemp(prefix="slayer-sbx-", dir=_workdir_parent()))  # the sample's own directory
    uid = _fresh_uid() if (mode in ("namespaces+uid", "uid") and caps["root"]) else None
    python, prefix = _interpreter()
    expose = []
    blocked = _blocked_ancestor(prefix)
    if uid is not None and blocked is not None:
        if mode == "namespaces+uid":
            expose = [(blocked, prefix)]
        else:  # no mount namespace: the sample's uid cannot reach our interpreter; use a system one
            sys_py = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)
                           and _blocked_ancestor(p) is None), None)
            if sys_py is None:
                uid = None  # nothing it could run: fall back to our uid (documented)
            else:
                python = sys_py
    t0 = time.perf_counter()
    proc = None
    try:
        prog = work / "main.py"
        prog.write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(prog, uid, uid)
        os.chmod(work, 0o700)
        nproc = limits.nproc
        if uid is None and os.geteuid() != 0:
            nproc += _count_uid_procs(os.geteuid())  # NPROC counts all of our own uid's processes
        rl = [("RLIMIT_CPU", int(limits.cpu_seconds)), ("RLIMIT_AS", int(limits.memory_bytes)),
              ("RLIMIT_FSIZE", int(limits.file_bytes)), ("RLIMIT_NOFILE", int(limits.open_files)),
              ("RLIMIT_CORE", 0)]
        if uid is not None or os.geteuid() != 0:
            rl.append(("RLIMIT_NPROC", int(nproc)))
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        spec = {"work": str(work), "prog": str(prog), "python": python, "env": env, "rlimits": rl,
                "uid": uid, "readonly": mode in ("namespaces+uid", "userns"), "expose": expose,
                "stage": str(host_dir)}
        sup = [sys.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(spec)]
        if mode == "namespaces+uid":
            cmd = [caps["unshare"], "--net", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child"] + sup
        elif mode == "userns":
            cmd = [caps["unshare"], "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount",
                   "--mount-proc", "--kill-child"] + sup
        else:
            cmd = sup
        out_p, err_p = host_dir / "stdout", host_dir / "stderr"
        with open(out_p, "wb") as out_f, open(err_p, "wb") as err_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, cwd=str(work),
                                    env=env, start_new_session=True, close_fds=True)
            try:
                rc = proc.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
            finally:
                _kill_group(proc)
        wall = time.perf_counter() - t0
        stdout, stderr = _tail(out_p, limits.output_bytes), _tail(err_p, limits.output_bytes)
        if timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc in (126, 127) and "sandbox: could not start" in stderr:
            status = "error"
        elif rc is not None and rc > 128:
            status = "killed"
        else:
            status = "failed"
        return Result(status, rc, stdout, stderr, wall, mode)
    except Exception as e:  # noqa: BLE001 - the evaluator must finish the rest
        return Result("error", None, "", f"sandbox: {e!r}", time.perf_counter() - t0, mode)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        if uid is not None:
            _sweep_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (unshare + the supervisor = the namespace's init) and reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_many(programs: list[str], limits: Limits = Limits(), workers: int = 2, isolation: str = "auto",
             progress: bool = False) -> list[Result]:
    """Each program in its own sandbox, ``workers`` at a time; results in order."""

    results: list[Result | None] = [None] * len(programs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="execute", unit="sample")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        futs = {ex.submit(run_python, p, limits, isolation): i for i, p in enumerate(programs)}
        for f in futs:
            results[futs[f]] = f.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def probe() -> dict[str, Any]:
    """Run a harmless program in the sandbox and report what it could see and do (for docs / tests)."""
    code = r"""
import json, os, socket
r = {"uid": os.getuid(), "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd()}
try:
    r["interfaces"] = [n for _, n in socket.if_nameindex()]
except OSError as e:
    r["interfaces"] = repr(e)
try:
    open("/slayer_sandbox_probe", "w").close(); r["write_root"] = True; os.remove("/slayer_sandbox_probe")
except OSError:
    r["write_root"] = False
try:
    open("/tmp/slayer_sandbox_probe_%d" % os.getpid(), "w").close(); r["write_tmp"] = True
except OSError:
    r["write_tmp"] = False
r["visible_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:20]
print(json.dumps(r))
"""
    res = run_python(code, Limits(wall_seconds=20))
    out = {"capabilities": capabilities(), "status": res.status, "stderr": res.stderr[-500:]}
    try:
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        pass
    return out
