"""Paths that are either local or ``gs://``: the package's storage helpers.

Every path the package writes (orbax checkpoints, metrics JSON/JSONL, an exported HF directory,
TensorBoard event logs) may be a local path or a ``gs://bucket/prefix`` URL. This module is the one
place that knows the difference:

- :func:`as_path` / :func:`is_remote`: an ``etils.epath.Path`` for either kind. ``gs://`` URLs stay
  remote (a plain ``pathlib.Path`` would collapse them to ``gs:/...`` and, worse, to a local
  ``./gs:/...`` directory); local paths are made absolute.
- :func:`append_line`, :func:`write_text_atomic`: small text files (metrics, run summaries).
- :func:`copy_tree`, :func:`download_tree`: whole directories (an HF export staged locally, then
  published; a gs:// HF directory pulled into a local cache).
- :func:`summary_writer`: a tensorboardX ``SummaryWriter`` for a local or gs:// logdir.

The gs:// side goes through fsspec's ``gcsfs`` (``pip install gcsfs``), which etils' epath also
uses when tensorflow is absent; orbax writes its arrays through tensorstore's own GCS driver. Both
honour a local emulator for tests (``STORAGE_EMULATOR_HOST`` for gcsfs, ``TENSORSTORE_GCS_HTTP_URL``
for tensorstore; see ``tests/gcs_emulator.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from etils import epath

from slayer_jax.errors import SlayerError

GS = "gs://"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The project's one local cache: ``cache_dir``, else ``$SLAYER_CACHE``, else ``~/.cache/slayer_jax``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SLAYER_CACHE") or Path.home() / ".cache" / "slayer_jax"
    return Path(cache_dir).expanduser()


# ----------------------------------------------------------------------------- staging beside a target
_HOST = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:40] or "host"
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|part)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove what writers to ``target`` that died left beside it (``.NAME.tmp|old|part-HOST-PID``):
    only this host's, and only of processes that no longer run, never a live writer's (a shared
    filesystem's other hosts keep theirs). Returns what was removed."""
    target = Path(target)
    removed = []
    try:
        siblings = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return removed
    for p in siblings:
        m = _STAGED.match(p.name)
        if m and m["name"] == target.name and m["host"] == _HOST and not _alive(int(m["pid"])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def staging_path(target: str | os.PathLike, tag: str = "tmp") -> Path:
    """Where a write to the local path ``target`` stages before its rename (``tag``: tmp, old or
    part), beside it on the same filesystem; stale ones of dead writers are removed first."""
    target = Path(target)
    remove_stale_staging(target)
    return target.parent / f".{target.name}.{tag}-{_HOST}-{os.getpid()}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def require_free_space(target: str | os.PathLike, need_bytes: int, what: str = "the output") -> None:
    """Refuse, before anything is written, a local write of ``need_bytes`` that the filesystem
    holding ``target`` (or its nearest existing parent) has no room for; gs:// is not checked."""
    if is_remote(target):
        return
    where = Path(target).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    margin = 1 << 16  # config and metadata files (a tokenizer that then does not fit fails as one line too)
    if free < need_bytes + margin:
        raise SlayerError(f"{target}: {what} needs {_gib(need_bytes + margin)} and its filesystem has "
                          f"{_gib(free)} free; nothing was written")


def name_failed_write(e: BaseException, target: str | os.PathLike) -> None:
    """An ``OSError`` from a write inside a staging directory (ENOSPC from ``write()``) names no
    file: name the target, so the CLI's one line says which output failed."""
    if isinstance(e, OSError) and not e.filename:
        e.filename = os.fspath(target)


def _str(p: str | os.PathLike) -> str:
    s = os.fspath(p)
    return s.decode() if isinstance(s, bytes) else s


def is_remote(p: str | os.PathLike) -> bool:
    """True for a ``gs://`` URL. Also true for ``gs:/bucket/...``, which is what ``pathlib.Path``
    makes of a ``gs://`` URL (``Path("gs://b/x")`` prints ``gs:/b/x``), so such a path is still
    treated as the bucket it meant and never as a local ``./gs:`` directory."""
    return _str(p).startswith("gs:/")


def _url(p: str | os.PathLike) -> str:
    """The canonical ``gs://bucket/key`` form of a remote path (no trailing slash)."""
    s = _str(p)
    return GS + s[len("gs:"):].lstrip("/").rstrip("/")


def as_path(p: str | os.PathLike) -> epath.Path:
    """An ``epath.Path``: ``gs://...`` kept remote, a local path made absolute (``~`` expanded)."""
    if is_remote(p):
        return epath.Path(_url(p))
    return epath.Path(Path(_str(p)).expanduser().absolute())


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, bucket/key path) of a gs:// URL, with its listing cache dropped so a
    listing sees what other filesystem instances (epath's, orbax's) wrote."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(_url(url))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


# ----------------------------------------------------------------------------- small text files
def append_line(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` as one line (a trailing newline is added) to a text file, creating it.

    Local: a real append (``open(..., "a")``), parent directories created.
    gs://: GCS objects are immutable, so this is a read-modify-write of the whole object: fine for
    a metrics JSONL written every few steps, quadratic for a huge file, and only safe with a single
    writer (the main process), since two concurrent appenders can lose each other's line.
    """
    line = text.removesuffix("\n")
    if "\n" in line:
        raise ValueError(f"append_line: text must be one line, got {text!r}")
    data = (line + "\n").encode("utf-8")
    if is_remote(path):
        fs, key = _fs(_str(path))
        try:
            old = fs.cat_file(key)
        except FileNotFoundError:
            old = b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        fs.pipe_file(key, old + data)
        return
    p = Path(as_path(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "ab") as f:
        f.write(data)


class LineLog:
    """An append-only text log (metrics JSONL) on local disk or gs://.

    Local: every ``append`` is a real append, so a killed run keeps every line. gs://: objects are
    immutable, so the lines written so far are kept in memory (the existing object is read once, at
    open) and the whole object is rewritten on ``flush()``: once per checkpoint, not once per line
    (which would make a long run's metrics quadratic in traffic). Lines since the last flush are
    lost if the process is killed; the steps they describe are redone after resume anyway.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _str(path)
        self._lines: list[bytes] | None = None
        if is_remote(self.path):
            fs, key = _fs(self.path)
            try:
                old = fs.cat_file(key)
            except FileNotFoundError:
                old = b""
            self._lines = [line + b"\n" for line in old.splitlines() if line.strip()]

    def append(self, text: str) -> None:
        if self._lines is None:
            append_line(self.path, text)
            return
        line = text.removesuffix("\n")
        if "\n" in line:
            raise ValueError(f"LineLog.append: text must be one line, got {text!r}")
        self._lines.append((line + "\n").encode("utf-8"))

    def flush(self) -> None:
        if self._lines is not None:
            fs, key = _fs(self.path)
            fs.pipe_file(key, b"".join(self._lines))

    def keep(self, wanted) -> int:
        """Drop the lines for which ``wanted(text)`` is false (e.g. steps after the checkpoint a run
        resumes from, which it will redo); returns how many were dropped. Local files are rewritten
        atomically, and only when something is dropped."""
        if self._lines is not None:
            before = len(self._lines)
            self._lines = [b for b in self._lines if wanted(b.decode("utf-8").rstrip("\n"))]
            return before - len(self._lines)
        p = Path(as_path(self.path))
        if not p.exists():
            return 0
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if wanted(line)]
        if len(kept) != len(lines):
            write_text_atomic(p, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a text file's content so a reader sees the old or the new file, never a part.

    Local: written to a temporary file in the same directory, fsynced, then ``os.replace``d.
    gs://: one object upload, which GCS already makes visible all at once.
    """
    if is_remote(path):
        fs, key = _fs(_str(path))
        fs.pipe_file(key, text.encode("utf-8"))
        return
    p = Path(as_path(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- directories
def _swap_in(staged: Path, dst: Path) -> None:
    """Put the finished directory ``staged`` at ``dst`` (same filesystem): two renames, so ``dst``
    is only ever the old complete tree, briefly absent, or the new complete tree."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(staged, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, dst)


def _stage_dir(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))


MARKER_FILES = ("manifest.json", "config.json")  # what is_prepared / a model loader look for first


def copy_tree(src_local_dir: str | os.PathLike, dst: str | os.PathLike) -> epath.Path:
    """Publish the finished local directory ``src_local_dir`` at ``dst``, replacing what was there.

    gs://: every file is uploaded to ``dst/<relative path>`` (concurrently; the top-level
    ``MARKER_FILES`` last), then objects under
    ``dst/`` that the source lacks (e.g. shards of an older export) are deleted. GCS has no
    directory rename, so readers may see the new files appear one by one: publish before telling
    anyone the path. Empty directories are not represented.
    Local: copied to a temporary sibling of ``dst`` and renamed into place. ``src`` is left as is.
    Returns ``as_path(dst)``.
    """
    src = Path(_str(src_local_dir)).expanduser().absolute()
    if is_remote(src_local_dir) or not src.is_dir():
        raise NotADirectoryError(f"copy_tree: {src_local_dir} is not a local directory")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    rels = [p.relative_to(src).as_posix() for p in files]
    if is_remote(dst):
        fs, root = _fs(_str(dst))
        # The files that make a directory recognisable (a prepared corpus's manifest, a model's
        # config) are removed first and uploaded last: an interrupted upload is never taken for a
        # complete one, old or new.
        marks = [i for i, r in enumerate(rels) if r in MARKER_FILES]
        for i in marks:
            if fs.exists(f"{root}/{rels[i]}"):
                fs.rm(f"{root}/{rels[i]}")
        for batch in ([i for i in range(len(files)) if i not in marks], marks):
            if batch:
                fs.put([str(files[i]) for i in batch], [f"{root}/{rels[i]}" for i in batch])
        fs.invalidate_cache()
        keep = {f"{root}/{r}" for r in rels}
        stale = [k for k in fs.find(root) if k.startswith(root + "/") and k not in keep]
        if stale:
            fs.rm(stale)
        return as_path(dst)
    out = Path(as_path(dst))
    if out == src or src in out.parents:
        raise ValueError(f"copy_tree: destination {out} is inside the source {src}")
    staged = _stage_dir(out)
    try:
        shutil.copytree(src, staged, dirs_exist_ok=True)
        _swap_in(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return as_path(out)


def download_tree(src: str | os.PathLike, dst_local_dir: str | os.PathLike) -> Path:
    """Copy the directory ``src`` (gs:// or local) to the local ``dst_local_dir``, replacing it.

    The files are fetched into a temporary sibling of ``dst_local_dir`` and renamed into place, so
    a cache directory is never left half-downloaded. Raises ``FileNotFoundError`` when ``src``
    holds no file. Returns the local directory as a ``pathlib.Path``.
    """
    dst = Path(as_path(dst_local_dir))
    if is_remote(dst_local_dir):
        raise ValueError(f"download_tree: destination must be local, got {dst_local_dir}")
    if not is_remote(src):
        if not Path(as_path(src)).is_dir():
            raise FileNotFoundError(f"download_tree: {src} is not a directory")
        copy_tree(src, dst)
        return dst
    fs, root = _fs(_str(src))
    keys = sorted(k for k in fs.find(root) if k.startswith(root + "/") and not k.endswith("/"))
    if not keys:
        raise FileNotFoundError(f"download_tree: no files under {_url(src)}")
    staged = _stage_dir(dst)
    try:
        lpaths = [staged / k[len(root) + 1:] for k in keys]
        for lp in lpaths:
            lp.parent.mkdir(parents=True, exist_ok=True)
        fs.get(keys, [str(lp) for lp in lpaths])
        _swap_in(staged, dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dst


# ----------------------------------------------------------------------------- TensorBoard
def _drain(event_file_writer: Any) -> None:
    """Write every event queued so far into the event file. tensorboardX's ``flush()`` only
    flushes the file: a worker thread moves events from a queue into it, so without this an
    upload right after ``flush()`` can miss the latest scalars. Stopping the worker queues a stop
    signal behind the pending events and joins the thread; a new worker then takes over the same
    queue and file. (Private tensorboardX attributes, checked for; if absent, nothing is done.)"""
    worker = getattr(event_file_writer, "_worker", None)
    if worker is None or getattr(event_file_writer, "_closed", True) or not hasattr(worker, "stop"):
        return
    worker.stop()
    new = type(worker)(event_file_writer._event_queue, event_file_writer._ev_writer,
                       event_file_writer._flush_secs)
    event_file_writer._worker = new
    new.start()


def summary_writer(logdir: str | os.PathLike, **kwargs: Any):
    """A tensorboardX ``SummaryWriter`` writing to ``logdir``, local or gs://.

    Local: a plain ``SummaryWriter`` on the absolute path. gs://: the event files are written to a
    local staging directory and uploaded (new or grown files only) on every ``flush()`` and on
    ``close()``; call ``flush()`` at each logging interval so the bucket stays current (events
    since the last flush are lost if the process is killed). tensorboardX's own gs:// writer is
    not used: it needs google-cloud-storage credentials of its own, keeps the whole file in
    memory and re-uploads it from ``__del__``, which can hang an exiting process.
    ``kwargs`` go to ``SummaryWriter`` (``flush_secs``, ``filename_suffix``, ...).
    """
    from tensorboardX import SummaryWriter

    if not is_remote(logdir):
        return SummaryWriter(logdir=str(as_path(logdir)), **kwargs)

    class StagedSummaryWriter(SummaryWriter):
        """``SummaryWriter`` whose event files are mirrored to ``remote_logdir`` on flush/close."""

        def __init__(self, remote: str, **kw: Any):
            self.remote_logdir = remote
            self._staging = tempfile.mkdtemp(prefix="slayer_tb_")
            self._sent: dict[str, int] = {}
            super().__init__(logdir=self._staging, **kw)

        def _upload(self) -> None:
            lpaths, rpaths, sizes = [], [], {}
            for dirpath, _, names in os.walk(self._staging):
                for name in names:
                    lp = os.path.join(dirpath, name)
                    rel = os.path.relpath(lp, self._staging).replace(os.sep, "/")
                    size = os.path.getsize(lp)
                    if self._sent.get(rel) != size:
                        lpaths.append(lp)
                        rpaths.append(rel)
                        sizes[rel] = size
            if lpaths:
                fs, root = _fs(self.remote_logdir)
                fs.put(lpaths, [f"{root}/{r}" for r in rpaths])
                self._sent.update(sizes)

        def flush(self) -> None:
            for fw in (self.all_writers or {}).values():
                _drain(getattr(fw, "event_writer", None))
            super().flush()
            self._upload()

        def close(self) -> None:
            super().close()
            if os.path.isdir(self._staging):
                self._upload()
                shutil.rmtree(self._staging, ignore_errors=True)
                self._sent = {}

    return StagedSummaryWriter(_url(logdir), **kwargs)


def cached_copy(url: str) -> Path:
    """A local copy of the gs:// file or directory ``url`` (a model, a corpus) under
    ``$SLAYER_CACHE/remote/``, fetched once per host and fetched again when any object changed
    (name, size, generation or checksum, recorded beside the copy). Processes sharing the cache
    (several per host, or a shared cache directory) take turns under a file lock, so only one
    downloads; :func:`download_tree` never leaves a copy half-written."""

    import fsspec


    url = _url(url)
    cache = cache_root() / "remote"  # the project's one cache root ($SLAYER_CACHE)
    local = cache / url.split("://", 1)[1].strip("/")
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    prefix = root.rstrip("/") + "/"
    listing = {("" if p == root.rstrip("/") else p[len(prefix):]): [
        int(i.get("size") or 0), str(i.get("generation") or i.get("md5Hash") or i.get("crc32c") or i.get("mtime") or "")]
        for p, i in found.items() if p.startswith(prefix) or p == root.rstrip("/")}
    if not listing:
        raise SlayerError(f"{url}: not found or empty; expected a file or a directory of files")
    single = list(listing) == [""]  # one object (a .jsonl, .parquet, .gguf file), not a directory
    record = local.parent / f".{local.name}.listing.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            have = json.loads(record.read_text()) if record.exists() and local.exists() else None
        except (OSError, json.JSONDecodeError):
            have = None
        if have != listing:
            if single:
                staged = staging_path(local, "part")
                fs.get(root, str(staged))
                os.replace(staged, local)
            else:
                download_tree(url, local)
            write_text_atomic(record, json.dumps(listing, sort_keys=True))
    return local
