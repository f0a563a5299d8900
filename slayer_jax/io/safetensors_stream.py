"""Streaming safetensors read and write, one tensor at a time.

The ``safetensors`` library's ``save_file`` takes every tensor at once, and ``safe_open``
keeps the whole file memory-mapped (its pages count towards RSS until it closes). To keep
an import -> export round trip near one copy of the model, this module writes the same
on-disk format header-first and then tensor by tensor, and reads each tensor with one
``pread`` into a fresh buffer. Files it writes are read back by the ``safetensors`` library
and by transformers (tested).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from slayer_jax.errors import SlayerError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """The header of one .safetensors file, and a reader for its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise SlayerError(f"{self.path}: file not found; expected a safetensors weight file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SlayerError(f"{self.path}: truncated safetensors file (no 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(self.file_size - 8, 100_000_000):
                raise SlayerError(f"{self.path}: corrupt or truncated safetensors header (length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SlayerError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > self.file_size:
            raise SlayerError(f"{self.path}: truncated safetensors file: header needs {self.data_start + end} "
                              f"bytes, file has {self.file_size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise SlayerError(f"{self.path}: tensor '{name}' has dtype {e['dtype']}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise SlayerError(f"{self.path}: tensor '{name}' has {end - begin} bytes, shape {e['shape']} needs "
                              f"{count * dtype.itemsize}")
        out = np.empty(count, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(out.view(np.uint8))
        if got != end - begin:
            raise SlayerError(f"{self.path}: truncated while reading tensor '{name}'")
        return out.reshape(e["shape"])


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      get: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write ``path`` from ``(name, shape, dtype)`` specs, calling ``get(name)`` once per tensor,
    in order, so only one tensor needs to be in host memory at a time. Returns bytes written."""
    specs = list(specs)
    header: dict[str, dict] = {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_obj = ({"__metadata__": metadata} if metadata else {}) | header
    blob = json.dumps(header_obj, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(get(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: got {arr.dtype}{arr.shape}, announced {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
