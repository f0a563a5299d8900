"""Training data, in the order it flows: sources -> tokens -> pipeline (packed rows, the grain loader).

``sources`` reads documents and chats; ``tokens`` turns them into token lists (separators, SFT loss
masks); ``pipeline`` packs them into the rows ``model.forward`` and the loss read, and loads them
resumably. ``prepare`` writes a corpus tokenised and packed once; ``training_data`` opens whichever
a run names; ``corpus`` builds the demo's offline code corpus. This face hands the pipeline's names on.
"""

from slayer_jax.data.pipeline import (
    ARRAY_KEYS,
    LONG_DOCS,
    Documents,
    Mixture,
    PackStats,
    default_packing_bins,
    get_state,
    grain_range,
    iter_pieces,
    make_dataset,
    make_loader,
    pack_documents,
    packed_row,
    set_state,
    state_to_bytes,
)
from slayer_jax.data.sources import (
    DocumentList,
    check_messages,
    iter_chats,
    iter_documents,
    load_chat_jsonl,
    load_chats,
    load_documents,
    parse_sources,
    split_txt,
)
from slayer_jax.data.tokens import (
    assistant_char_spans,
    end_of_text_id,
    ends_chat_turns,
    iter_tokenized,
    separator_id,
    sft_example,
    tokenize_documents,
)

__all__ = [
    "ARRAY_KEYS", "LONG_DOCS", "Documents", "Mixture", "PackStats", "default_packing_bins", "get_state", "grain_range",
    "iter_pieces", "make_dataset", "make_loader", "pack_documents", "packed_row", "set_state", "state_to_bytes",
    "DocumentList", "check_messages", "iter_chats", "iter_documents", "load_chat_jsonl", "load_chats",
    "load_documents", "parse_sources", "split_txt",
    "assistant_char_spans", "end_of_text_id", "ends_chat_turns", "iter_tokenized", "separator_id", "sft_example",
    "tokenize_documents",
]
