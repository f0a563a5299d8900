"""Where training text comes from: documents and chats from files, folders and datasets, checked line by line.

Every reader here yields plain Python values (a document is a ``str``, a chat a list of messages)
and names the file, the line and the field of anything malformed in one :class:`SlayerError`.
:mod:`slayer_jax.data.tokens` turns them into token lists, :mod:`slayer_jax.data.pipeline` packs them.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from slayer_jax.errors import SlayerError, first_line

TEXT_SUFFIXES = (".txt", ".md", ".py")
DATASET_SUFFIXES = {".json": "json", ".csv": "csv", ".arrow": "arrow"}
DOC_SEPARATOR = "\f"  # in a .txt file, a line holding only a form feed separates documents


# ============================================================================ documents
class DocumentList(list):
    """``list[str]`` of non-empty documents, plus ``source`` and ``num_empty`` (empty ones skipped)."""

    def __init__(self, docs: Iterable[str] = (), *, source: str = "", num_empty: int = 0):
        super().__init__(docs)
        self.source = source
        self.num_empty = num_empty


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SlayerError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlayerError(f"{path}: byte {e.start} is not UTF-8; expected UTF-8 text") from None


def _lines(text: str) -> list[str]:
    """Lines with their ``\n`` ends, split at ``\n`` only."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def split_txt(text: str) -> list[str]:
    """A ``.txt`` file's documents: the text between lines that hold only a form feed (``\\f``)."""
    docs, cur = [], []
    # split on "\n" only: str.splitlines would also break at the form feed itself (and at \x1c, \u2028, ...)
    for line in _lines(text):
        if line.rstrip("\r\n") == DOC_SEPARATOR:
            docs.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("".join(cur))
    return docs


def _text_files(d: Path) -> list[Path]:
    out = []
    for p in d.rglob("*"):
        rel = p.relative_to(d)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(d).as_posix())


def _is_saved_dataset(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or (d / "state.json").is_file()


def _numbered_lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line); a damaged gzip stream is a one-line SlayerError."""
    n = 0
    while True:
        try:
            raw = f.readline()
        except (OSError, EOFError, zlib.error) as e:
            raise SlayerError(f"{path}: line {n + 1}: unreadable ({first_line(e)[:100]}); expected a gzipped "
                              f"JSONL file") from None
        if not raw:
            return
        n += 1
        yield n, raw


def iter_jsonl(path: Path, *, objects: bool = True, empty_ok: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line of a UTF-8 JSONL file (``.gz``: gzipped),
    streamed: a large file is never held whole. The one JSONL reader of the package (training data,
    chats, evaluation files): anything malformed is a one-line SlayerError naming the line.
    ``objects``: every value must be a JSON object; ``empty_ok``: a file without lines is no error."""
    try:  # lines end at "\n" only
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise SlayerError(f"{path}: cannot read ({e.strerror})") from None
    seen = False
    with f:
        for lineno, raw in _numbered_lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SlayerError(f"{path}: line {lineno}: byte {e.start} is not UTF-8; expected UTF-8 text") from None
            if not line.strip():
                continue
            seen = True
            yield lineno, _json_value(path, lineno, line, objects)
    if not seen and not empty_ok:
        raise SlayerError(f"{path}: file is empty; expected one JSON object per line")


def _json_value(path: Path, lineno: int, line: str, objects: bool) -> Any:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SlayerError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                          f"expected one JSON object per line") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; arrays nested too deeply
        raise SlayerError(f"{path}: line {lineno}: not valid JSON ({first_line(e)[:100]}); "
                          f"expected one JSON object per line") from None
    if objects and not isinstance(obj, dict):
        raise SlayerError(f"{path}: line {lineno}: a JSON {type(obj).__name__}; expected one JSON object per line")
    return obj


def check_text(value: str, where: str, field: str) -> str:
    """``value`` if it is Unicode text; JSON's ``"\\ud800"`` escapes give lone surrogates, which no
    tokenizer can encode: a one-line SlayerError naming ``field``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SlayerError(f"{where}: field '{field}' holds a lone surrogate {value[e.start]!r} at character "
                          f"{e.start}; expected Unicode text") from None
    return value


def _fields(obj: dict) -> str:
    """The field names of a JSON object for an error line; one that could break the line is quoted."""
    names = [k if k.isprintable() else repr(k) for k in list(obj)[:20]]
    return ", ".join(names + (["..."] if len(obj) > 20 else [])) or "none"


def _check_doc(value: Any, where: str, field: str) -> str | None:
    """The document string, or None for an empty one; anything but str/None is a SlayerError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SlayerError(f"{where}: field '{field}' is a {type(value).__name__}; expected a string")
    return check_text(value, where, field) if value.strip() else None


def _load_hf_dataset(source: str, split: str, *, saved: bool = False, builder: str | None = None):
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise SlayerError(f"{source}: the 'datasets' package is needed to read it") from None
    try:
        if saved:
            ds = datasets.load_from_disk(source)
        elif builder is not None:
            ds = datasets.load_dataset(builder, data_files=source, split=split)
        else:
            ds = datasets.load_dataset(source, split=split)
    except SlayerError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
        raise SlayerError(f"{source}: cannot load as a datasets dataset (split '{split}'): {first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SlayerError(f"{source}: no split '{split}'; it has {sorted(ds)}")
        ds = ds[split]
    return ds


def load_documents(source: str | os.PathLike, *, field: str = "text", split: str = "train") -> DocumentList:
    """The non-empty documents of ``source``, in a fixed order.

    ``source`` is one of (checked in this order):

    - a ``.txt`` file: documents are separated by lines holding only a form feed (``\\f``, what
      ``printf '\\f\\n'`` writes); a file without such a line is one document;
    - a ``.md`` / ``.py`` file: one document;
    - a ``.jsonl`` file: one JSON object per line, the document in string field ``field``
      (blank lines are skipped);
    - a ``.parquet`` file: the string column ``field``;
    - a ``.json`` / ``.csv`` / ``.arrow`` file: read with ``datasets`` (column ``field``);
    - a directory written by ``datasets.save_to_disk``: ``datasets.load_from_disk`` (split ``split``);
    - a directory holding ``.txt`` / ``.md`` / ``.py`` files (searched recursively, hidden paths
      skipped): one document per file, in sorted relative-path order;
    - any other directory, or a name that is not a path: ``datasets.load_dataset(source, split=split)``
      (a hub name only works online), column ``field``.

    Documents that are empty or whitespace-only (including empty files inside a directory and
    null values) are skipped and counted in ``.num_empty``. An empty source file, a malformed
    JSONL line, a missing field or column, a non-string value, or a source with no non-empty
    document raises :class:`SlayerError` with one line naming the file, the line or field, and
    what was expected.
    """
    counts = {"empty": 0}
    docs = list(iter_documents(source, field=field, split=split, counts=counts))
    return DocumentList(docs, source=str(source), num_empty=counts["empty"])


def _dataset_column(ds, source: str, field: str, batch: int = 4096) -> Iterator[Any]:
    """Column ``field`` of a datasets ``Dataset``, read ``batch`` rows at a time."""
    names = list(ds.column_names)
    if field not in names:
        raise SlayerError(f"{source}: no column '{field}' (columns: {', '.join(names)}); "
                          f"expected a text column named '{field}'")
    for i in range(0, len(ds), batch):
        yield from ds[i: i + batch][field]


def iter_documents(source: str | os.PathLike, *, field: str = "text", split: str = "train",
                   counts: dict | None = None) -> Iterator[str]:
    """:func:`load_documents` as a stream: the non-empty documents one at a time (a file or a
    batch of dataset rows in memory at once, never the corpus). ``counts["empty"]`` (when given)
    counts the skipped empty ones; the same one-line errors, "no non-empty documents" at the end."""
    src = str(source)
    path = Path(src).expanduser()
    counts = {} if counts is None else counts
    counts.setdefault("empty", 0)
    found = 0

    def keep(value: Any, where: str) -> str | None:
        nonlocal found
        doc = _check_doc(value, where, field)
        if doc is None:
            counts["empty"] += 1
        else:
            found += 1
        return doc

    def rows(ds, name: str) -> Iterator[str]:
        for i, v in enumerate(_dataset_column(ds, name, field)):
            d = keep(v, f"{name}: row {i}")
            if d is not None:
                yield d

    suffix = path.suffix.lower()
    if path.is_file():
        if path.stat().st_size == 0:
            raise SlayerError(f"{path}: file is empty; expected at least one document")
        if suffix == ".txt":
            for i, d in enumerate(split_txt(_read_text(path)), 1):
                if keep(d, f"{path}: document {i}") is not None:
                    yield d
        elif suffix in (".md", ".py"):
            d = keep(_read_text(path), str(path))
            if d is not None:
                yield d
        elif suffix == ".jsonl":
            for lineno, obj in iter_jsonl(path):
                if field not in obj:
                    raise SlayerError(f"{path}: line {lineno}: no field '{field}' (fields: {_fields(obj)}); "
                                      f"expected a string field '{field}'")
                if keep(obj[field], f"{path}: line {lineno}") is not None:
                    yield obj[field]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001
                raise SlayerError(f"{path}: not a readable parquet file ({first_line(e)})") from None
            names = pf.schema_arrow.names
            if field not in names:
                raise SlayerError(f"{path}: no column '{field}' (columns: {', '.join(names)}); "
                                  f"expected a string column '{field}'")
            i = 0
            for batch in pf.iter_batches(columns=[field], batch_size=4096):
                for v in batch.column(0).to_pylist():
                    if keep(v, f"{path}: row {i}") is not None:
                        yield v
                    i += 1
        elif suffix in DATASET_SUFFIXES:
            yield from rows(_load_hf_dataset(str(path), split, builder=DATASET_SUFFIXES[suffix]), str(path))
        else:
            raise SlayerError(f"{path}: unsupported file type '{suffix}'; expected .txt, .md, .py, .jsonl, "
                              f".parquet, .json, .csv, .arrow, a directory or a datasets name")
    elif path.is_dir():
        if _is_saved_dataset(path):
            yield from rows(_load_hf_dataset(str(path), split, saved=True), str(path))
        else:
            files = _text_files(path)
            if files:
                for f in files:
                    d = keep(_read_text(f), str(f))
                    if d is not None:
                        yield d
            else:
                if not any(p.is_file() for p in path.rglob("*")):
                    raise SlayerError(f"{path}: directory has no files; expected .txt/.md/.py files or data files")
                yield from rows(_load_hf_dataset(str(path), split), str(path))
    else:
        looks_like_path = suffix in (".txt", ".md", ".py", ".jsonl", ".parquet", *DATASET_SUFFIXES) \
            or src.startswith((".", "/", "~")) or os.sep + os.sep in src
        if looks_like_path:
            raise SlayerError(f"{src}: no such file or directory")
        yield from rows(_load_hf_dataset(src, split), src)
    if not found:
        raise SlayerError(f"{src}: no non-empty documents ({counts['empty']} empty); expected text in field '{field}'")


# ============================================================================ chats (SFT)
def check_messages(messages: Any, where: str) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str}``; else a one-line SlayerError."""
    if not isinstance(messages, list) or not messages:
        raise SlayerError(f"{where}: field 'messages' is {type(messages).__name__ if messages != [] else 'empty'}; "
                          f"expected a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SlayerError(f"{where}: messages[{j}] is a {type(m).__name__}; "
                              f"expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise SlayerError(f"{where}: messages[{j}] has no field '{key}'; "
                                  f"expected string fields 'role' and 'content'")
            if not isinstance(m[key], str):
                raise SlayerError(f"{where}: messages[{j}].{key} is a {type(m[key]).__name__}; expected a string")
            check_text(m[key], where, f"messages[{j}].{key}")
        out.append(m)
    return out


def load_chat_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """The conversations of a JSONL file with one ``{"messages": [{"role", "content"}, ...]}`` per line."""
    return list(_iter_chat_jsonl(Path(path).expanduser(), "messages"))


def _iter_chat_jsonl(path: Path, field: str) -> Iterator[list[dict]]:
    """The conversations of a chat JSONL file, one line at a time."""
    if not path.is_file():
        raise SlayerError(f"{path}: no such file; expected a chat .jsonl file")
    if path.stat().st_size == 0:
        raise SlayerError(f"{path}: file is empty; expected one {{\"{field}\": [...]}} object per line")
    n = 0
    for lineno, obj in iter_jsonl(path):
        if field not in obj:
            if field != "messages":
                raise SlayerError(f"{path}: line {lineno}: no field '{field}'; expected a list of messages")
            raise SlayerError(f"{path}: line {lineno}: no field 'messages' (fields: {_fields(obj)}); "
                              f"expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        n += 1
        yield check_messages(obj[field], f"{path}: line {lineno}")
    if not n:
        raise SlayerError(f"{path}: no conversations; expected one {{\"{field}\": [...]}} object per line")


def load_chats(source: str | os.PathLike, *, field: str = "messages", split: str = "train") -> list[list[dict]]:
    """Conversations from a chat ``.jsonl`` file, or from column ``field`` of a datasets source."""
    return list(iter_chats(source, field=field, split=split))


def iter_chats(source: str | os.PathLike, *, field: str = "messages", split: str = "train") -> Iterator[list[dict]]:
    """:func:`load_chats` as a stream, one conversation at a time."""
    src = str(source)
    if Path(src).suffix.lower() == ".jsonl":
        yield from _iter_chat_jsonl(Path(src).expanduser(), field)
        return
    p = Path(src).expanduser()
    if p.is_dir() and _is_saved_dataset(p):
        ds = _load_hf_dataset(str(p), split, saved=True)
    elif p.is_file() and p.suffix.lower() in DATASET_SUFFIXES:
        ds = _load_hf_dataset(str(p), split, builder=DATASET_SUFFIXES[p.suffix.lower()])
    elif p.is_file() and p.suffix.lower() == ".parquet":
        ds = _load_hf_dataset(str(p), split, builder="parquet")
    else:
        ds = _load_hf_dataset(src, split)
    for i, m in enumerate(_dataset_column(ds, src, field)):
        yield check_messages(m, f"{src}: row {i}")



# ============================================================================ training entry point
def parse_sources(spec: str, key: str = "data.source") -> list[tuple[str, float]]:
    """``"A"`` -> ``[("A", 1.0)]``; ``"A@1.0;B@1.5"`` -> a mixture, weights in rows (see :class:`Mixture`).
    A part's weight is what follows its last ``@`` when that parses as a number."""
    parts = [x.strip() for x in str(spec).split(";")]
    if not str(spec).strip() or any(not x for x in parts):
        raise SlayerError(f"{key}: {spec!r}; expected SOURCE or SOURCE@WEIGHT;SOURCE@WEIGHT;...")
    out = []
    for part in parts:
        src, at, w = part.rpartition("@")
        try:
            weight = float(w) if at else None
        except ValueError:
            weight = None
        if weight is None:
            src, weight = part, 1.0
        if not src.strip() or not (weight > 0 and np.isfinite(weight)):
            raise SlayerError(f"{key}: component {part!r}; expected SOURCE@WEIGHT with a positive weight")
        out.append((src.strip(), weight))
    return out
