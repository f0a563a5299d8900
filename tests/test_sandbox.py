"""The sandbox contains hostile programs, counts them as failures, and the evaluator finishes the rest.

What is asserted depends on what this machine allows (``sandbox.capabilities()``): with PID/net/mount
namespaces and a separate uid (root + unshare, as on the project's machines) every attack below is
asserted contained; the fork bomb only ever runs where RLIMIT_NPROC binds (a non-root uid), so it can
never hurt the machine running the tests.
"""

import os
import socket
import time

import pytest

from slayer_jax.evaluation import sandbox

CAPS = sandbox.capabilities()
FULL = CAPS["mode"] == "namespaces+uid"
LIM = sandbox.Limits(wall_seconds=4, cpu_seconds=2, memory_bytes=1 << 30, nproc=16)


def test_report_capabilities():
    print("sandbox capabilities:", CAPS)
    info = sandbox.probe()
    print("probe:", info)
    assert info["status"] == "passed"
    if FULL:
        assert info["uid"] != 0 and info["pid"] == 2 and info["interfaces"] == ["lo"]
        assert info["write_root"] is False and info["write_tmp"] is False
        assert info["visible_pids"] == [1, 2]  # the supervisor and the sample: nothing of ours


def test_ok_and_failing_programs():
    assert sandbox.run_python("print(sum(range(10)))", LIM).stdout == "45\n"
    r = sandbox.run_python("assert 1 == 2", LIM)
    assert r.status == "failed" and "AssertionError" in r.stderr
    assert sandbox.run_python("import sys; sys.exit(3)", LIM).returncode == 3


def test_infinite_loop_is_killed():
    r = sandbox.run_python("while True:\n    pass", LIM)
    assert r.status in ("killed", "timeout") and not r.passed  # CPU limit (SIGKILL) or the wall clock
    assert r.wall_s < LIM.wall_seconds + 3


def test_sleeping_forever_hits_the_wall_clock_and_children_die_too():
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"  # escapes the process group
            "time.sleep(1000)\n")
    t = time.perf_counter()
    r = sandbox.run_python(code, LIM)
    assert r.status == "timeout" and time.perf_counter() - t < LIM.wall_seconds + 5
    if CAPS["separate_uid"]:
        assert not any(_uid_procs_over(1_000_000_000))


def _uid_procs_over(uid_min):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
                if uid >= uid_min:
                    yield int(d)
            except (OSError, StopIteration):
                pass


def test_allocating_10gb_fails():
    r = sandbox.run_python("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", LIM)
    assert not r.passed and "allocated" not in r.stdout and "MemoryError" in r.stderr


@pytest.mark.skipif(not (CAPS["nproc_binds"] and (CAPS["separate_uid"] or os.geteuid() != 0)),
                    reason="RLIMIT_NPROC cannot bind here (root without a separate uid): not running a fork bomb")
def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = sandbox.run_python(code, LIM)
    assert not r.passed and r.status in ("timeout", "killed", "failed")
    if CAPS["separate_uid"]:  # nothing of the bomb survived
        assert not any(_uid_procs_over(1_000_000_000))


CONTAINED_WRITES = CAPS["readonly_root"] or CAPS["separate_uid"] or os.geteuid() != 0
CONTAINED_SIGNALS = CAPS["pid_namespace"] or CAPS["separate_uid"] or os.geteuid() != 0


@pytest.mark.skipif(not CONTAINED_WRITES, reason="root without namespaces or a separate uid: writes are not contained")
def test_writes_outside_its_directory_fail(tmp_path):
    target = tmp_path / "escape.txt"  # a directory the sample could otherwise name
    os.chmod(tmp_path, 0o777)
    code = (f"open({str(target)!r}, 'w').write('x')\n")
    r = sandbox.run_python(code, LIM)
    assert not r.passed and not target.exists()
    r = sandbox.run_python("import os\nopen('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())", LIM)
    assert r.passed and r.stdout == "ok\n"  # its own directory is writable
    if FULL:
        r = sandbox.run_python("open('/tmp/slayer_sandbox_escape', 'w').write('x')", LIM)
        assert not r.passed and "Read-only file system" in r.stderr
    assert not os.path.exists("/tmp/slayer_sandbox_escape")


@pytest.mark.skipif(not CAPS["net_namespace"], reason="no network namespace on this machine")
def test_network_is_unreachable():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    r = sandbox.run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                           f"s.sendall(b'hello')\nprint('connected')", LIM)
    assert not r.passed and "connected" not in r.stdout
    with pytest.raises(OSError):
        srv.accept()  # nothing ever reached our listener
    srv.close()


@pytest.mark.skipif(not CONTAINED_SIGNALS, reason="root without a PID namespace or a separate uid: not sending signals")
def test_killing_the_parent_fails():
    me = os.getpid()
    for code in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                 f"import os, signal\nos.kill({me}, signal.SIGKILL)",
                 f"import os, signal\nos.killpg(os.getpgid({me}), signal.SIGKILL)"):
        r = sandbox.run_python(code, LIM)
        assert not r.passed
    assert os.getpid() == me  # still here
    if CAPS["separate_uid"]:  # kill(-1) = everything the caller may signal: only its own uid's processes
        r = sandbox.run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('after')", LIM)
        assert "after" not in r.stdout


def test_huge_output_is_capped():
    r = sandbox.run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", LIM)
    assert not r.passed and len(r.stdout) <= LIM.output_bytes + 100


def test_evaluator_finishes_the_rest():
    """Hostile and honest programs mixed: every honest one passes, every hostile one is a failure."""
    hostile = ["while True:\n    pass", "x = bytearray(10 * 1024 ** 3)", "import time; time.sleep(100)",
               "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", "raise SystemExit(1)"]
    if CONTAINED_WRITES:
        hostile[4] = "open('/etc/slayer_x', 'w').write('x')"
    if CONTAINED_SIGNALS:
        hostile[3] = "import os; os.kill(os.getppid(), 9)"
    honest = [f"assert {i} + {i} == {2 * i}" for i in range(5)]
    progs = [p for pair in zip(hostile, honest) for p in pair]
    res = sandbox.run_many(progs, LIM, workers=2)
    assert [r.passed for r in res] == [False, True] * 5
    assert not os.path.exists("/etc/slayer_x")
