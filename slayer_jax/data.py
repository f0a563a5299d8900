"""Data: load documents, tokenise, pack into fixed-length rows, SFT loss masks, a resumable grain loader.

The pipeline ``make_dataset`` walks::

    source ──load_documents / load_chats──▶ texts or chats
           ──tokenize_documents / sft_example──▶ token lists (+ SFT loss masks)
           ──pack_documents──▶ {inputs, targets, positions, segment_ids, weights}: [N, T] numpy
           ──make_loader──▶ grain iterator of [B, T] batches whose state resumes exactly

Packed rows (what ``model.forward`` and the loss read)
------------------------------------------------------
``inputs``      int32 [N, T]  token ids; 0 on padding.
``targets``     int32 [N, T]  ``targets[r, i] = inputs[r, i+1]`` when token i+1 is in the same document
                              (same segment), else 0. Targets never cross documents or rows.
``positions``   int32 [N, T]  0, 1, 2, ... restarting at every document (and every chunk of a split one).
``segment_ids`` int32 [N, T]  1, 2, 3, ... per document inside a row; 0 on padding.
``weights``     float32 [N, T] 1 where ``targets`` is a real next token that counts in the loss, else 0
                              (each document's last token, padding, and in SFT every non-assistant target).

Loss = sum(weights * CE(logits, targets)) / sum(weights).

Packing rule: *best fit* in document order. Each document (with the optional BOS/EOS around it)
goes whole into the open row with the least room that still fits it, or opens a new row.
Documents longer than ``seq_len`` are split into ``seq_len`` chunks (each chunk its own segment,
positions restart; the one next-token target across each cut is lost), dropped, or refused
(``long_docs``). Every token of every kept document appears exactly once in ``inputs``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from slayer_jax.errors import SlayerError

ARRAY_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
TEXT_SUFFIXES = (".txt", ".md", ".py")
DATASET_SUFFIXES = {".json": "json", ".csv": "csv", ".arrow": "arrow"}
DOC_SEPARATOR = "\f"  # in a .txt file, a line holding only a form feed separates documents
LONG_DOCS = ("split", "drop", "error")


def _one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is a one-line SlayerError."""
    text = _read_text(path)
    if not text.strip():
        raise SlayerError(f"{path}: file is empty; expected one JSON object per line")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlayerError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                              f"expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise SlayerError(f"{path}:{lineno}: a JSON {type(obj).__name__}; expected one JSON object per line")
        yield lineno, obj


def _check_doc(value: Any, where: str, field: str) -> str | None:
    """The document string, or None for an empty one; anything but str/None is a SlayerError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SlayerError(f"{where}: field '{field}' is a {type(value).__name__}; expected a string")
    return value if value.strip() else None


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
        raise SlayerError(f"{source}: cannot load as a datasets dataset (split '{split}'): {_one_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SlayerError(f"{source}: no split '{split}'; it has {sorted(ds)}")
        ds = ds[split]
    return ds


def _column(ds, source: str, field: str) -> list:
    names = list(ds.column_names)
    if field not in names:
        raise SlayerError(f"{source}: no column '{field}' (columns: {', '.join(names)}); "
                          f"expected a text column named '{field}'")
    return ds[field]


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
    src = str(source)
    path = Path(src).expanduser()
    docs: list[str] = []
    empty = 0

    def add(value: Any, where: str) -> None:
        nonlocal empty
        doc = _check_doc(value, where, field)
        if doc is None:
            empty += 1
        else:
            docs.append(doc)

    suffix = path.suffix.lower()
    if path.is_file():
        if path.stat().st_size == 0:
            raise SlayerError(f"{path}: file is empty; expected at least one document")
        if suffix == ".txt":
            for i, d in enumerate(split_txt(_read_text(path)), 1):
                add(d, f"{path}: document {i}")
        elif suffix in (".md", ".py"):
            add(_read_text(path), str(path))
        elif suffix == ".jsonl":
            for lineno, obj in _iter_jsonl(path):
                if field not in obj:
                    raise SlayerError(f"{path}:{lineno}: no field '{field}' (fields: {', '.join(obj) or 'none'}); "
                                      f"expected a string field '{field}'")
                add(obj[field], f"{path}:{lineno}")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
            except Exception as e:  # noqa: BLE001
                raise SlayerError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
            if field not in schema.names:
                raise SlayerError(f"{path}: no column '{field}' (columns: {', '.join(schema.names)}); "
                                  f"expected a string column '{field}'")
            col = pq.read_table(path, columns=[field]).column(field)
            for i, v in enumerate(col.to_pylist()):
                add(v, f"{path}: row {i}")
        elif suffix in DATASET_SUFFIXES:
            ds = _load_hf_dataset(str(path), split, builder=DATASET_SUFFIXES[suffix])
            for i, v in enumerate(_column(ds, str(path), field)):
                add(v, f"{path}: row {i}")
        else:
            raise SlayerError(f"{path}: unsupported file type '{suffix}'; expected .txt, .md, .py, .jsonl, "
                              f".parquet, .json, .csv, .arrow, a directory or a datasets name")
    elif path.is_dir():
        if _is_saved_dataset(path):
            ds = _load_hf_dataset(str(path), split, saved=True)
            for i, v in enumerate(_column(ds, str(path), field)):
                add(v, f"{path}: row {i}")
        else:
            files = _text_files(path)
            if files:
                for f in files:
                    add(_read_text(f), str(f))
            else:
                if not any(p.is_file() for p in path.rglob("*")):
                    raise SlayerError(f"{path}: directory has no files; expected .txt/.md/.py files or data files")
                ds = _load_hf_dataset(str(path), split)
                for i, v in enumerate(_column(ds, str(path), field)):
                    add(v, f"{path}: row {i}")
    else:
        looks_like_path = suffix in (".txt", ".md", ".py", ".jsonl", ".parquet", *DATASET_SUFFIXES) \
            or src.startswith((".", "/", "~")) or os.sep + os.sep in src
        if looks_like_path:
            raise SlayerError(f"{src}: no such file or directory")
        ds = _load_hf_dataset(src, split)
        for i, v in enumerate(_column(ds, src, field)):
            add(v, f"{src}: row {i}")
    if not docs:
        raise SlayerError(f"{src}: no non-empty documents ({empty} empty); expected text in field '{field}'")
    return DocumentList(docs, source=src, num_empty=empty)


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
        out.append(m)
    return out


def load_chat_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """The conversations of a JSONL file with one ``{"messages": [{"role", "content"}, ...]}`` per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SlayerError(f"{path}: no such file; expected a chat .jsonl file")
    if path.stat().st_size == 0:
        raise SlayerError(f"{path}: file is empty; expected one {{\"messages\": [...]}} object per line")
    chats = []
    for lineno, obj in _iter_jsonl(path):
        if "messages" not in obj:
            raise SlayerError(f"{path}:{lineno}: no field 'messages' (fields: {', '.join(obj) or 'none'}); "
                              f"expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        chats.append(check_messages(obj["messages"], f"{path}:{lineno}"))
    if not chats:
        raise SlayerError(f"{path}: no conversations; expected one {{\"messages\": [...]}} object per line")
    return chats


def load_chats(source: str | os.PathLike, *, field: str = "messages", split: str = "train") -> list[list[dict]]:
    """Conversations from a chat ``.jsonl`` file, or from column ``field`` of a datasets source."""
    src = str(source)
    if Path(src).suffix.lower() == ".jsonl":
        if field != "messages":
            path = Path(src).expanduser()
            chats = []
            for lineno, obj in _iter_jsonl(path):
                if field not in obj:
                    raise SlayerError(f"{path}:{lineno}: no field '{field}'; expected a list of messages")
                chats.append(check_messages(obj[field], f"{path}:{lineno}"))
            return chats
        return load_chat_jsonl(src)
    p = Path(src).expanduser()
    if p.is_dir() and _is_saved_dataset(p):
        ds = _load_hf_dataset(str(p), split, saved=True)
    elif p.is_file() and p.suffix.lower() in DATASET_SUFFIXES:
        ds = _load_hf_dataset(str(p), split, builder=DATASET_SUFFIXES[p.suffix.lower()])
    elif p.is_file() and p.suffix.lower() == ".parquet":
        ds = _load_hf_dataset(str(p), split, builder="parquet")
    else:
        ds = _load_hf_dataset(src, split)
    return [check_messages(m, f"{src}: row {i}") for i, m in enumerate(_column(ds, src, field))]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the [start, end) characters that count in the loss.

    Per-turn incremental rendering: for assistant message k, ``P`` = render(messages[:k],
    add_generation_prompt=True) and ``Q`` = render(messages[:k+1]). Both must be prefixes of the full
    rendering (true for ChatML, Llama 3, Mistral, ... templates). The turn is ``Q[len(P):]``: the
    assistant content and the template's end-of-turn text. The span starts where the content starts
    inside it (so a header the generation prompt does not cover is still excluded) and ends at the
    turn's end with trailing whitespace removed: for ChatML that is ``content + "<|im_end|>"``,
    without ``<|im_start|>assistant\\n`` and without the newline after ``<|im_end|>``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise SlayerError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat_template; "
                          f"expected a tokenizer with a chat template for SFT")
    try:
        full = _render(tokenizer, messages, False)
    except Exception as e:  # noqa: BLE001 - jinja errors (e.g. raise_exception on role order)
        raise SlayerError(f"chat template refused the conversation: {_one_line(e)}") from None
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = _render(tokenizer, messages[:k], True)
        except Exception:  # noqa: BLE001 - some templates refuse an empty or partial list
            try:
                prefix = _render(tokenizer, messages[:k], False)
            except Exception as e:  # noqa: BLE001
                if k:
                    raise SlayerError(f"chat template cannot render the first {k} messages "
                                      f"({_one_line(e)}); cannot locate assistant message {k}") from None
                prefix = ""  # nothing precedes the first message; the content search skips its header
        upto = _render(tokenizer, messages[: k + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise SlayerError(f"chat template is not incremental at message {k}: rendering the first {k + 1} "
                              f"messages is not a prefix of rendering them all; cannot locate the assistant turn")
        turn = upto[len(prefix):]
        content = m["content"]
        i = turn.find(content)
        if i < 0:
            content = content.strip()
            i = turn.find(content)
        if i < 0:
            raise SlayerError(f"chat template does not render assistant message {k}'s content verbatim; "
                              f"cannot locate it for the loss mask")
        start = len(prefix) + i
        end = len(prefix) + max(len(turn.rstrip()), i + len(content))
        spans.append((start, end))
    return full, spans


def sft_example(tokenizer, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [L], loss_mask int32 [L]) of one conversation rendered by the tokenizer's chat template.

    ``loss_mask[j] = 1`` when token j is an assistant content token or the assistant's end-of-turn
    token (e.g. ``<|im_end|>``); 0 on system, user and tool text and on every template header such as
    ``<|im_start|>assistant\\n``. The rendered text is tokenised once with
    ``add_special_tokens=False`` (what ``apply_chat_template(tokenize=True)`` does); a token counts
    when its first character lies in an assistant span (:func:`assistant_char_spans`), found via the
    fast tokenizer's offsets mapping. ``loss_mask`` marks *tokens*; :func:`pack_documents` moves it
    onto the positions that predict them.
    """
    messages = check_messages(list(messages) if isinstance(messages, tuple) else messages, "messages")
    full, spans = assistant_char_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise SlayerError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: a slow tokenizer; "
                          f"SFT masks need a fast tokenizer (offsets mapping)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64).reshape(-1)
    mask = np.zeros(len(ids), np.int32)
    for s, e in spans:
        mask |= ((starts >= s) & (starts < e)).astype(np.int32)
    return ids, mask


# ============================================================================ tokenise
def _bos_by_default(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _token_id(tokenizer, tok: int | str, what: str) -> int:
    if isinstance(tok, (int, np.integer)):
        return int(tok)
    tid = tokenizer.convert_tokens_to_ids(tok)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None) or tokenizer.convert_ids_to_tokens(tid) != tok:
        raise SlayerError(f"{what}: token {tok!r} is not in the tokenizer's vocabulary")
    return int(tid)


def tokenize_documents(tokenizer, docs: Sequence[str], *, add_bos: bool | None = None, add_eos: bool = True,
                       eos: int | str | None = None, batch_size: int = 1024,
                       progress: bool = False) -> list[np.ndarray]:
    """int32 token arrays, one per document: ``[bos] + tokens(doc) + [eos]``.

    The text is tokenised with ``add_special_tokens=False``; BOS and EOS are added here, once.
    ``add_bos=None`` follows the tokenizer (BOS when ``tokenizer("a")`` starts with it, as Llama's
    does). ``eos`` overrides the tokenizer's EOS (an id or a token string, e.g. ``"<|endoftext|>"``
    for SmolLM2-Instruct, whose EOS is the chat end-of-turn ``<|im_end|>``). Pass the result to
    :func:`pack_documents` without ``bos_id``/``eos_id``.
    """
    if add_bos is None:
        add_bos = _bos_by_default(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise SlayerError("tokenizer: no bos_token; expected one for add_bos=True")
    eos_id = tokenizer.eos_token_id if eos is None else _token_id(tokenizer, eos, "eos")
    if add_eos and eos_id is None:
        raise SlayerError("tokenizer: no eos_token; expected one for add_eos=True (or pass eos=)")
    bos = [tokenizer.bos_token_id] if add_bos else []
    eos = [eos_id] if add_eos else []
    out = []
    starts = range(0, len(docs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tokenize", unit="batch")
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, and no "longer than max length" warning
    for i in starts:
        batch = list(docs[i: i + batch_size])
        if backend is not None:
            rows = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            rows = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in rows:
            out.append(np.asarray(bos + list(ids) + eos, np.int32))
    return out


# ============================================================================ pack
@dataclasses.dataclass
class PackStats:
    """What packing did. ``tokens`` counts kept tokens (BOS/EOS included); all are in ``inputs`` once."""

    seq_len: int = 0
    documents: int = 0          # non-empty token lists received
    empty: int = 0              # zero-length token lists skipped (plus empty source documents, in make_dataset)
    split: int = 0              # documents longer than seq_len that were split
    chunks: int = 0             # chunks those became (each is one segment)
    dropped: int = 0            # documents longer than seq_len that were dropped
    dropped_tokens: int = 0
    no_loss: int = 0            # SFT examples with no assistant token, skipped (make_dataset)
    tokens: int = 0             # tokens placed in rows
    loss_tokens: int = 0        # sum of weights
    rows: int = 0
    padding: int = 0

    @property
    def fill(self) -> float:
        """Fraction of row slots holding a token."""
        return self.tokens / max(1, self.rows * self.seq_len)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fill": self.fill}


_INT32_MAX = int(np.iinfo(np.int32).max)


def _segments(token_lists, loss_masks, seq_len, bos_id, eos_id, long_docs, stats):
    """Yield (tokens int32, mask int8 or None = all ones) pieces of at most seq_len tokens.

    Applies BOS/EOS and the long-document rule, and validates the token lists.
    """
    pre = np.asarray([] if bos_id is None else [int(bos_id)], np.int32)
    post = np.asarray([] if eos_id is None else [int(eos_id)], np.int32)
    for d, toks in enumerate(token_lists):
        toks = np.asarray(toks)
        if toks.ndim != 1 or (toks.size and not np.issubdtype(toks.dtype, np.integer)):
            raise SlayerError(f"document {d}: token list has shape {toks.shape} and dtype {toks.dtype}; "
                              f"expected a 1-D list of integer token ids")
        if toks.size == 0:
            stats.empty += 1
            continue
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi > _INT32_MAX:
            raise SlayerError(f"document {d}: token id {lo if lo < 0 else hi} out of range; expected 0 <= id < 2**31")
        mask = None
        if loss_masks is not None:
            mask = np.asarray(loss_masks[d], np.int8)
            if mask.shape != toks.shape:
                raise SlayerError(f"document {d}: loss mask has shape {mask.shape}; expected {toks.shape}")
        if pre.size or post.size:
            toks = np.concatenate([pre, toks.astype(np.int32), post])
            if mask is not None:
                mask = np.concatenate([np.zeros(pre.size, np.int8), mask, np.ones(post.size, np.int8)])
        else:
            toks = toks.astype(np.int32, copy=False)
        stats.documents += 1
        n = toks.size
        if n <= seq_len:
            yield toks, mask
            continue
        if long_docs == "error":
            raise SlayerError(f"document {d}: {n} tokens is longer than seq_len {seq_len}; "
                              f"expected long_docs='split' or 'drop', or a larger seq_len")
        if long_docs == "drop":
            stats.dropped += 1
            stats.dropped_tokens += n
            continue
        stats.split += 1
        for s in range(0, n, seq_len):
            stats.chunks += 1
            yield toks[s: s + seq_len], None if mask is None else mask[s: s + seq_len]


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int | None = None,
                   eos_id: int | None = None, long_docs: str = "split",
                   loss_masks: Sequence[Sequence[int]] | None = None) -> tuple[dict[str, np.ndarray], PackStats]:
    """Pack whole documents into rows of ``seq_len``; returns ``(arrays, PackStats)``.

    ``arrays`` has the keys of :data:`ARRAY_KEYS`, each ``[N, seq_len]`` (see the module docstring).
    ``bos_id`` / ``eos_id``, when given, are put around every document before packing (leave them
    None if :func:`tokenize_documents` already added them). Rows are filled *best fit* in document
    order: a document goes into the open row with the least remaining room that fits it, else a new
    row; within a row documents keep their placement order and get segment ids 1, 2, ....

    ``long_docs`` for documents longer than ``seq_len`` (after BOS/EOS): ``"split"`` into
    consecutive ``seq_len`` chunks, each a separate segment with positions from 0 (the last, shorter
    chunk is packed like any document); ``"drop"``; ``"error"`` (SlayerError). Zero-length lists
    are skipped. All are counted in the stats.

    ``loss_masks`` (SFT): per document, 1 on tokens to learn. The weight of position i is the mask of
    token i+1 (the token it predicts); an added BOS has mask 0 and an added EOS mask 1.
    """
    if int(seq_len) < 1:
        raise SlayerError(f"seq_len: {seq_len}; expected a positive integer")
    if long_docs not in LONG_DOCS:
        raise SlayerError(f"long_docs: {long_docs!r}; expected one of {list(LONG_DOCS)}")
    if loss_masks is not None and len(loss_masks) != len(token_lists):
        raise SlayerError(f"loss_masks: {len(loss_masks)} masks for {len(token_lists)} documents; expected one each")
    T = int(seq_len)
    stats = PackStats(seq_len=T)
    toks_l: list[np.ndarray] = []
    masks_l: list[np.ndarray | None] = []
    rows_l: list[int] = []          # per piece: row, start column, segment id
    cols_l: list[int] = []
    segs_l: list[int] = []
    row_fill: list[int] = []
    row_segs: list[int] = []
    # open rows by remaining room: open_by_room[c] = stack of rows with room c; has_room[c] = its size
    open_by_room: list[list[int]] = [[] for _ in range(T + 1)]
    has_room = np.zeros(T + 1, np.int64)
    for toks, mask in _segments(token_lists, loss_masks, T, bos_id, eos_id, long_docs, stats):
        n = toks.size
        hit = np.flatnonzero(has_room[n:])
        if hit.size:
            room = n + int(hit[0])
            row = open_by_room[room].pop()
            has_room[room] -= 1
        else:
            row, room = len(row_fill), T
            row_fill.append(0)
            row_segs.append(0)
        rows_l.append(row)
        cols_l.append(row_fill[row])
        row_segs[row] += 1
        segs_l.append(row_segs[row])
        toks_l.append(toks)
        masks_l.append(mask)
        row_fill[row] += n
        room -= n
        if room > 0:
            open_by_room[room].append(row)
            has_room[room] += 1
    N = len(row_fill)
    arrays = {k: np.zeros((N, T), np.float32 if k == "weights" else np.int32) for k in ARRAY_KEYS}
    # Pieces in (row, column) order form each row's tokens back to back, padding only at row ends,
    # so blocks of rows are filled with one boolean-mask assignment per key.
    order = np.lexsort((np.asarray(cols_l, np.int64), np.asarray(rows_l, np.int64)))
    lengths_all = np.fromiter((t.size for t in toks_l), np.int64, len(toks_l))
    lengths = lengths_all[order]
    segs = np.asarray(segs_l, np.int32)[order]
    piece_rows = np.asarray(rows_l, np.int64)[order]
    fill = np.asarray(row_fill, np.int64)
    block = max(1, (1 << 24) // T)
    p0 = 0
    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        p1 = int(np.searchsorted(piece_rows, r1))
        idx = order[p0:p1]
        L = lengths[p0:p1]
        total = int(L.sum())
        first = np.cumsum(L) - L
        pos = np.arange(total, dtype=np.int32) - np.repeat(first.astype(np.int32), L)
        tok = np.concatenate([toks_l[k] for k in idx])
        last = np.zeros(total, bool)
        last[first + L - 1] = True                       # each piece's last token predicts nothing
        tgt = np.empty(total, np.int32)
        tgt[:-1] = tok[1:]
        tgt[last] = 0
        w = np.zeros(total, np.float32)
        if all(masks_l[k] is None for k in idx):
            w[:] = 1.0
        else:
            m = np.concatenate([np.ones(toks_l[k].size, np.int8) if masks_l[k] is None else masks_l[k] for k in idx])
            w[:-1] = m[1:]
        w[last] = 0.0
        valid = np.arange(T)[None, :] < fill[r0:r1, None]
        for key, val in (("inputs", tok), ("targets", tgt), ("positions", pos),
                         ("segment_ids", np.repeat(segs[p0:p1], L)), ("weights", w)):
            arrays[key][r0:r1][valid] = val
        p0 = p1
    stats.rows = N
    stats.tokens = int(lengths_all.sum())
    stats.padding = N * T - stats.tokens
    stats.loss_tokens = int(arrays["weights"].sum(dtype=np.float64))
    return arrays, stats


# ============================================================================ loader
def _num_rows(arrays: dict[str, np.ndarray]) -> int:
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise SlayerError(f"packed arrays: no key '{missing[0]}'; expected keys {list(ARRAY_KEYS)}")
    shapes = {k: np.shape(arrays[k]) for k in arrays}
    first = shapes[ARRAY_KEYS[0]]
    for k, s in shapes.items():
        if len(s) != 2 or s != first:
            raise SlayerError(f"packed arrays: '{k}' has shape {s}; expected {first} like '{ARRAY_KEYS[0]}'")
    return first[0]


def _gather(arrays: dict[str, np.ndarray]):
    def fn(idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        return {k: v[idx] for k, v in arrays.items()}

    return fn


@functools.lru_cache(maxsize=None)
def _make_checked_dataset():
    """An IterDataset that adds the loader config to the state and checks it on restore."""
    import grain

    class _CheckedIterator(grain.DatasetIterator):
        def __init__(self, parent, config: dict):
            super().__init__(parent)
            self._config = config

        def __next__(self):
            return next(self._parent)

        def get_state(self) -> dict:
            return {"loader": dict(self._config), "grain": self._parent.get_state()}

        def set_state(self, state: dict) -> None:
            if not isinstance(state, dict) or "grain" not in state or "loader" not in state:
                raise SlayerError(f"data iterator state: keys {sorted(state) if isinstance(state, dict) else state!r}; "
                                  f"expected a state from slayer_jax.data.get_state")
            saved = state["loader"]
            for k, v in self._config.items():
                if saved.get(k) != v:
                    raise SlayerError(f"data iterator state: '{k}' was {saved.get(k)!r} when saved, now {v!r}; "
                                      f"resume with the same data and loader settings")
            self._parent.set_state(state["grain"])

    class _CheckedIterDataset(grain.IterDataset):
        def __init__(self, parent, config: dict):
            super().__init__(parent)
            self._config = config

        def __iter__(self):
            return _CheckedIterator(self._parent.__iter__(), self._config)

    return _CheckedIterDataset


def fingerprint(arrays: dict[str, np.ndarray], max_rows: int = 4096) -> str:
    """A short hash of packed arrays (stored in the loader state, checked on restore).

    Hashes every key's shape and dtype and the contents of up to ``max_rows`` evenly spaced rows,
    so it stays cheap on big corpora and still tells a different corpus or packing apart.
    """
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        h.update(f"{k}{a.shape}{a.dtype}".encode())
        rows = a if a.shape[0] <= max_rows else a[np.linspace(0, a.shape[0] - 1, max_rows).astype(np.int64)]
        h.update(np.ascontiguousarray(rows).tobytes())
    return h.hexdigest()[:16]


def _grain_seed(seed: int) -> int:
    """A 32-bit shuffle seed mixed from ``seed``. grain reshuffles epoch e with seed + e, so mixing keeps
    seed s's second epoch from being seed s+1's first."""
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


def make_loader(packed_arrays: dict[str, np.ndarray], *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                prefetch: int = 4, num_threads: int = 1):
    """A resumable iterator of batches ``{key: [batch_size, seq_len]}`` over this process's rows.

    Built on grain's dataset API (``grain.MapDataset`` -> ``.to_iter_dataset()``), whose iterators
    checkpoint exactly::

        MapDataset.range(rows)            # row indices, truncated so every shard gets as many rows
          [shard_index::shard_count]      # this host's rows: disjoint, strided
          .shuffle(mix(seed))             # a seeded permutation (skipped if shuffle=False)
          .repeat(num_epochs)             # None = forever; reshuffled each epoch (mix(seed) + epoch)
          .batch(batch_size, drop_remainder=True)   # batches run across epoch boundaries
          .map(gather rows)               # one numpy fancy-index per key
          .to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size=prefetch))

    ``batch_size`` is the per-process batch (global batch = batch_size * shard_count). Shards
    default to ``jax.process_index()`` / ``jax.process_count()``. Every element is a function of its
    index alone, so the state is just the grain iterator's position (``{"next_index": k}``) plus
    the loader settings and a content fingerprint of the arrays, which :func:`set_state` checks.

    The returned object is a ``grain.DatasetIterator``: :func:`get_state` / :func:`set_state`
    (JSON-serialisable dicts) work on it, and so do orbax's ``grain.checkpoint.CheckpointSave`` /
    ``CheckpointRestore`` (and the orbax v1 ``save``/``load`` methods).
    """
    import grain

    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (0 <= shard_index < shard_count):
        raise SlayerError(f"shard_index {shard_index}: expected 0 <= shard_index < shard_count ({shard_count})")
    if batch_size < 1:
        raise SlayerError(f"batch_size: {batch_size}; expected a positive integer")
    if not 0 <= int(seed) < 2**63:
        raise SlayerError(f"seed: {seed}; expected a non-negative integer")
    if num_epochs is not None:
        num_epochs = int(num_epochs)
        if num_epochs < 1:
            raise SlayerError(f"num_epochs: {num_epochs}; expected a positive integer or None (forever)")
    arrays = {k: np.asarray(v) for k, v in packed_arrays.items()}
    N = _num_rows(arrays)
    per_shard = N // shard_count
    if per_shard == 0:
        raise SlayerError(f"packed arrays: {N} rows for {shard_count} shards; expected at least one row per shard")
    if num_epochs is not None and per_shard * num_epochs < batch_size:
        raise SlayerError(f"packed arrays: {per_shard} rows per shard x {num_epochs} epochs is less than "
                          f"batch_size {batch_size}; expected at least one full batch")
    ds = grain.MapDataset.range(per_shard * shard_count)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=_grain_seed(seed))
    ds = ds.repeat(num_epochs)
    ds = ds.batch(int(batch_size), drop_remainder=True).map(_gather(arrays))
    read = grain.ReadOptions(num_threads=int(num_threads) if prefetch > 0 else 0, prefetch_buffer_size=int(prefetch))
    config = {"rows": int(N), "seq_len": int(arrays["inputs"].shape[1]), "batch_size": int(batch_size),
              "seed": int(seed), "shuffle": bool(shuffle), "num_epochs": num_epochs,
              "shard_index": int(shard_index), "shard_count": int(shard_count),
              "fingerprint": fingerprint(arrays)}
    return iter(_make_checked_dataset()(ds.to_iter_dataset(read), config))


def get_state(it) -> dict:
    """The loader's position as a JSON-serialisable dict (``json.dumps`` it, or let orbax do it)."""
    state = it.get_state()
    json.dumps(state)  # fail here, not at checkpoint time
    return state


def set_state(it, state: dict | str | bytes) -> None:
    """Restore a :func:`get_state` dict (or its JSON text/bytes): the next batches are the ones that followed it."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    it.set_state(state)


def state_to_bytes(it) -> bytes:
    """:func:`get_state` as JSON bytes (what to store beside a checkpoint if not using grain's handler)."""
    return json.dumps(get_state(it), sort_keys=True).encode()


# ============================================================================ all together
def make_dataset(source: str | os.PathLike, tokenizer, seq_len: int, *, mode: str = "text", field: str | None = None,
                 split: str = "train", add_bos: bool | None = None, add_eos: bool = True,
                 eos: int | str | None = None, long_docs: str | None = None,
                 progress: bool = False) -> tuple[dict[str, np.ndarray], PackStats]:
    """Load, tokenise and pack ``source``; returns ``(arrays, PackStats)`` ready for :func:`make_loader`.

    ``mode="text"``: :func:`load_documents` (``field`` default ``"text"``), :func:`tokenize_documents`
    (BOS per ``add_bos``, EOS per ``add_eos`` / ``eos``), :func:`pack_documents` (``long_docs`` default
    ``"split"``); every next token in a document counts in the loss.

    ``mode="sft"``: :func:`load_chats` (``field`` default ``"messages"``), :func:`sft_example` with the
    tokenizer's chat template (no extra BOS/EOS: the template has its own), packed with the masks
    folded into ``weights`` (``long_docs`` default ``"drop"``: a cut conversation would train
    answers without their question). Conversations without an assistant token are skipped and
    counted in ``stats.no_loss``.
    """
    if mode == "text":
        docs = load_documents(source, field=field or "text", split=split)
        toks = tokenize_documents(tokenizer, docs, add_bos=add_bos, add_eos=add_eos, eos=eos, progress=progress)
        arrays, stats = pack_documents(toks, seq_len, long_docs=long_docs or "split")
        stats.empty += docs.num_empty
        return arrays, stats
    if mode == "sft":
        chats = load_chats(source, field=field or "messages", split=split)
        toks, masks, no_loss = [], [], 0
        it = chats
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(chats, desc="sft", unit="chat")
        for i, msgs in enumerate(it):
            try:
                t, m = sft_example(tokenizer, msgs)
            except SlayerError as e:
                raise SlayerError(f"{source}: conversation {i + 1}: {e}") from None
            if not m.any():
                no_loss += 1
                continue
            toks.append(t)
            masks.append(m)
        if not toks:
            raise SlayerError(f"{source}: no conversation has an assistant message; expected some for SFT")
        arrays, stats = pack_documents(toks, seq_len, long_docs=long_docs or "drop", loss_masks=masks)
        stats.no_loss = no_loss
        return arrays, stats
    raise SlayerError(f"mode: {mode!r}; expected 'text' or 'sft'")


__all__ = [
    "ARRAY_KEYS", "DocumentList", "PackStats", "load_documents", "split_txt", "load_chat_jsonl", "load_chats",
    "check_messages", "assistant_char_spans", "sft_example", "tokenize_documents", "pack_documents",
    "make_loader", "get_state", "set_state", "state_to_bytes", "fingerprint", "make_dataset",
]
