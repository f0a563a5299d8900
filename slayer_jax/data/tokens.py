"""Text to token lists: document separators, BOS, and SFT loss masks from the chat template.

The separator after each raw-text document is the tokenizer's end-of-text token (``separator="auto"``),
never a chat end-of-turn token; SFT rows keep the chat template's own tokens.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from slayer_jax.data.sources import check_messages
from slayer_jax.errors import SlayerError, first_line


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
        raise SlayerError(f"chat template refused the conversation: {first_line(e)}") from None
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
                                      f"({first_line(e)}); cannot locate assistant message {k}") from None
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
# End-of-text tokens of the Llama-family tokenizers, in the order they are looked for: SmolLM/GPT-2/Qwen,
# Llama 3, Llama 1/2 and Mistral, Gemma, DeepSeek.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>")
SEPARATORS = ("auto", "eos", "none")


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
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None) and tok != tokenizer.unk_token \
            or tokenizer.convert_ids_to_tokens(tid) != tok:
        raise SlayerError(f"{what}: token {tok!r} is not in the tokenizer's vocabulary")
    return int(tid)


def ends_chat_turns(tokenizer, token: str) -> bool:
    """Whether the chat template writes ``token`` after a user turn (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``): an end-of-turn token, not an end of text."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn tells nothing
        return False
    return token in text


def end_of_text_id(tokenizer) -> int:
    """The token that ends a raw-text document: the tokenizer's EOS when it is an end-of-text
    token (Llama 2 ``</s>``, Llama 3 base ``<|end_of_text|>``), else the first special token of
    :data:`END_OF_TEXT_TOKENS` it has (SmolLM2-Instruct: ``<|endoftext|>``, not its EOS
    ``<|im_end|>``), else its EOS when the chat template does not end turns with it."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos in END_OF_TEXT_TOKENS:
        return int(tokenizer.eos_token_id)
    special = set(getattr(tokenizer, "all_special_tokens", ())) | set(tokenizer.get_added_vocab())
    for t in END_OF_TEXT_TOKENS:
        if t in special:
            return _token_id(tokenizer, t, "data.separator")
    if eos is not None and not ends_chat_turns(tokenizer, eos):
        return int(tokenizer.eos_token_id)
    raise SlayerError(f"tokenizer: field 'eos_token' is {eos!r}, which ends chat turns, and none of "
                      f"{list(END_OF_TEXT_TOKENS)} is a special token; expected data.separator=<token> or 'none'")


def separator_id(tokenizer, separator: str | int | None = "auto") -> int | None:
    """The id put after every raw-text document: ``"auto"`` = :func:`end_of_text_id`; ``"eos"`` = the
    tokenizer's EOS whatever it is; ``"none"`` (or None) = nothing; a token string or id = that token."""
    if separator is None or separator == "none":
        return None
    if separator == "auto":
        return end_of_text_id(tokenizer)
    if separator == "eos":
        if tokenizer.eos_token_id is None:
            raise SlayerError("tokenizer: no eos_token; expected one for data.separator='eos'")
        return int(tokenizer.eos_token_id)
    if isinstance(separator, str) and not separator:
        raise SlayerError(f"data.separator: ''; expected one of {list(SEPARATORS)} or a token")
    return _token_id(tokenizer, separator, "data.separator")


def tokenize_documents(tokenizer, docs: Sequence[str], *, add_bos: bool | None = None,
                       separator: str | int | None = "auto", batch_size: int = 1024,
                       progress: bool = False) -> list[np.ndarray]:
    """int32 token arrays, one per document: ``[bos] + tokens(doc) + [separator]``.

    The text is tokenised with ``add_special_tokens=False``; BOS and the separator are added here,
    once. ``add_bos=None`` follows the tokenizer (BOS when ``tokenizer("a")`` starts with it, as
    Llama's does). ``separator`` is resolved by :func:`separator_id`: by default the end-of-text
    token, never a chat end-of-turn token (SmolLM2-Instruct's EOS ``<|im_end|>`` would teach the
    model to end ordinary prose with it). Pass the result to :meth:`Documents.from_token_lists`
    without ``bos_id``/``eos_id``.
    """
    return list(iter_tokenized(tokenizer, iter(docs), add_bos=add_bos, separator=separator,
                               batch_size=batch_size, progress=progress))


def iter_tokenized(tokenizer, docs: Iterator[str], *, add_bos: bool | None = None,
                   separator: str | int | None = "auto", batch_size: int = 1024,
                   progress: bool = False) -> Iterator[np.ndarray]:
    """:func:`tokenize_documents` over a stream: one int32 array per document, ``batch_size`` at a time."""
    bos, eos = _bos_sep(tokenizer, add_bos, separator)
    return _tokenized(tokenizer, docs, bos, eos, batch_size, progress)


def _tokenized(tokenizer, docs: Iterator[str], bos: list[int], eos: list[int], batch_size: int,
               progress: bool = False) -> Iterator[np.ndarray]:
    """``bos + tokens(doc) + eos`` per document of the stream, tokenised ``batch_size`` at a time."""

    bar = None
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, and no "longer than max length" warning
    try:
        while True:
            batch = list(itertools.islice(docs, batch_size))  # a bad source fails here, before any bar
            if not batch:
                break
            if progress and bar is None:
                from tqdm.auto import tqdm

                bar = tqdm(desc="tokenize", unit="doc")
            if backend is not None:
                rows = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
            else:
                rows = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for ids in rows:
                yield np.asarray(bos + list(ids) + eos, np.int32)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def _bos_sep(tokenizer, add_bos: bool | None, separator) -> tuple[list[int], list[int]]:
    if add_bos is None:
        add_bos = _bos_by_default(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise SlayerError("tokenizer: no bos_token; expected one for add_bos=True")
    sep = separator_id(tokenizer, separator)
    return ([tokenizer.bos_token_id] if add_bos else []), ([] if sep is None else [sep])
