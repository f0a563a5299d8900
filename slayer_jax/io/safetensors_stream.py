"""Streaming safetensors read and write, one tensor at a time.

The ``safetensors`` library's ``save_file`` takes every tensor at once, and ``safe_open``
keeps the whole file memory-mapped (its pages count towards RSS until it closes). To keep
an import -> export round trip near one copy of the model, this module writes the same
on-disk format header-first and then tensor by tensor, and reads each tensor with one
``pread`` into a fresh buffer; ``read_slice``/``read_blocks`` read only the rows a block needs,
so a process of a multi-host job reads the rows of its own shards, not the whole tensor. Files
it writes are read back by the ``safetensors`` library and by transformers (tested).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from slayer_jax.errors import SlayerError
from slayer_jax.modeling.config import show_value

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _check_entry(path: Path, name: str, e: Any) -> None:
    """One header entry: {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]}."""
    def ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))

    if not isinstance(e, dict):
        raise SlayerError(f"{path}: safetensors header: tensor {name!r}: expected an object with dtype, shape and "
                          f"data_offsets")
    for field, ok, want in (("dtype", isinstance(e.get("dtype"), str), "a dtype name"),
                            ("shape", ints(e.get("shape")), "a list of integers >= 0"),
                            ("data_offsets", ints(e.get("data_offsets"), 2)
                             and e["data_offsets"][0] <= e["data_offsets"][1], "[begin, end] with begin <= end")):
        if not ok:
            raise SlayerError(f"{path}: safetensors header: tensor {name!r}: field '{field}' is "
                              f"{show_value(e.get(field, 'missing'))}; expected {want}")


class SafetensorsFile:
    """The header of one .safetensors file, and a reader for its tensors."""

    CHUNK_BYTES = 64 << 20  # row chunk read at a time by read_slice when it keeps only some columns

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bytes_read = 0  # tensor bytes read from the file so far (read and read_slice)
        if not self.path.is_file():
            raise SlayerError(f"{self.path}: {'not a file' if self.path.exists() else 'file not found'}; expected a "
                              f"safetensors weight file")
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
            except (ValueError, RecursionError):  # not JSON, not UTF-8, a 4300-digit number, nested too deeply
                raise SlayerError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        self.data_start = 8 + n
        if not isinstance(header, dict):
            raise SlayerError(f"{self.path}: safetensors header: expected a JSON object of tensor entries, got "
                              f"{type(header).__name__}")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise SlayerError(f"{self.path}: safetensors header: field '__metadata__' is "
                              f"{type(self.metadata).__name__}; expected an object of string values")
        for name, e in header.items():
            _check_entry(self.path, name, e)
        self.entries: dict[str, dict] = header
        spans = sorted((tuple(e["data_offsets"]), name) for name, e in header.items() if e["data_offsets"][1] >
                       e["data_offsets"][0])
        for ((_, end0), a), ((begin, _), b) in itertools.pairwise(spans):
            if begin < end0:
                raise SlayerError(f"{self.path}: safetensors header: tensors {a!r} and {b!r} overlap (data_offsets "
                                  f"{list(header[a]['data_offsets'])} and {list(header[b]['data_offsets'])}); "
                                  f"expected each tensor's bytes to be its own")
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > self.file_size:
            raise SlayerError(f"{self.path}: truncated safetensors file: header needs {self.data_start + end} "
                              f"bytes, file has {self.file_size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, absolute file offset) of tensor ``name``, after checking its header entry."""
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            shown = e["dtype"] if e["dtype"].isprintable() else repr(e["dtype"])  # no name breaks the line
            raise SlayerError(f"{self.path}: tensor {name!r} has dtype {shown}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        count = math.prod(e["shape"])  # exact: numpy's int64 product wraps around for huge shapes
        if end - begin != count * dtype.itemsize:
            raise SlayerError(f"{self.path}: tensor {name!r} has {end - begin} bytes, shape {e['shape']} needs "
                              f"{count * dtype.itemsize}")
        return dtype, tuple(e["shape"]), self.data_start + begin

    def _pread(self, f, offset: int, buf: np.ndarray, name: str) -> None:
        """Fill the contiguous ``buf`` with the bytes at ``offset``, or raise: the file is truncated."""
        view = memoryview(buf.reshape(-1).view(np.uint8))
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise SlayerError(f"{self.path}: truncated while reading tensor {name!r}")
            got += n
        self.bytes_read += got

    def read(self, name: str) -> np.ndarray:
        """The whole tensor ``name``, read with one ``pread`` into a fresh buffer."""
        return self.read_slice(name, ())

    def read_slice(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """``read(name)[index]``, reading only the rows (first dimension) that ``index`` selects.

        ``index`` is a tuple of slices with positive steps, one per leading dimension, as
        ``jax.make_array_from_callback`` passes them. The selected rows are one contiguous byte
        range: when the other dimensions are taken whole it is read straight into the result;
        otherwise it is read in chunks of about ``CHUNK_BYTES`` whose selected columns are
        copied out, so the extra memory is one chunk, never the whole tensor."""
        return self.read_blocks(name, [index])[0]

    def read_blocks(self, name: str, indices: Iterable[tuple[slice, ...]]) -> list[np.ndarray]:
        """``[read_slice(name, i) for i in indices]``, reading each needed row once: blocks that
        share rows (e.g. the column shards of one device row) are cut from the same chunk."""
        dtype, shape, offset = self._entry(name)
        blocks = []  # (out, row range, column index) of each block
        for index in indices:
            index = tuple(index)
            if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
                raise IndexError(f"{self.path}: tensor '{name}' of shape {list(shape)}: index {index} is not a "
                                 f"tuple of at most {len(shape)} slices")
            index += (slice(None),) * (len(shape) - len(index))
            ranges = [range(*i.indices(n)) for i, n in zip(index, shape)]
            if any(r.step < 1 for r in ranges):
                raise IndexError(f"{self.path}: tensor '{name}': index {index} has a non-positive step")
            out = np.empty(tuple(len(r) for r in ranges), dtype)
            blocks.append((out, ranges[0] if shape else range(1), tuple(slice(r.start, r.stop, r.step)
                                                                          for r in ranges[1:])))
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * dtype.itemsize
        rest = []  # blocks that keep only some columns, or every k-th row
        with open(self.path, "rb") as f:
            for out, rows, cols in blocks:
                if out.size == 0:
                    continue
                if rows.step == 1 and all(c.start == 0 and c.stop == n and c.step == 1
                                          for c, n in zip(cols, shape[1:])):
                    self._pread(f, offset + rows[0] * row_bytes, out, name)  # whole rows: straight in
                else:
                    rest.append((out, rows, cols))
            if not rest:
                return [b[0] for b in blocks]
            spans = sorted((r[0], r[-1] + 1) for _, r, _ in rest)
            merged = [list(spans[0])]
            for lo, hi in spans[1:]:  # disjoint row spans covering every remaining block
                if lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            chunk = max(1, self.CHUNK_BYTES // max(row_bytes, 1))
            buf = np.empty((min(chunk, max(hi - lo for lo, hi in merged)),) + shape[1:], dtype)
            for lo, hi in merged:
                for a in range(lo, hi, chunk):
                    b = min(a + chunk, hi)
                    part = buf[: b - a]
                    self._pread(f, offset + a * row_bytes, part, name)
                    for out, rows, cols in rest:
                        j0 = max(0, -(-(a - rows.start) // rows.step))  # first selected row >= a
                        j1 = min(len(rows), -(-(b - rows.start) // rows.step))  # first selected row >= b
                        if j0 < j1:
                            first = rows.start + j0 * rows.step - a
                            sel = slice(first, first + (j1 - j0 - 1) * rows.step + 1, rows.step)
                            out[j0:j1] = part[(sel,) + cols]
        return [b[0] for b in blocks]


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
            arr = np.asarray(get(name), order="C")  # (ascontiguousarray would make a scalar 1-d)
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: got {arr.dtype}{arr.shape}, announced {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
