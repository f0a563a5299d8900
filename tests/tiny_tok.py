"""A small byte-level BPE tokenizer trained on the shipped task data (offline, deterministic), and a tiny
random Llama exported through our own HF writer: the model dir that lm-eval's ``hf`` backend and ours both load."""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[1] / "slayer_jax" / "data_samples" / "harness_tasks"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    out = []
    for name in ("mcq.jsonl", "texts.jsonl", "gen.jsonl"):
        for line in (TASKS_DIR / name).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out += [str(v) if not isinstance(v, list) else " ".join(v) for v in row.values()]
    out += ["Question: Answer: def return if else for while import print", "0 1 2 3 4 5 6 7 8 9 10 11 12 100"]
    return out


def make_tokenizer(vocab_size: int = 512, add_bos: bool = True):
    """A PreTrainedTokenizerFast; with ``add_bos`` it prepends BOS like Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos = tk.token_to_id("<|im_start|>")
        tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                          special_tokens=[("<|im_start|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def make_exported_model(out_dir, seed: int = 0, layers: int = 2, add_bos: bool = True, std: float = 0.08):
    """Tiny random Llama -> our importer -> our HF exporter (+ tokenizer) at ``out_dir``; returns out_dir."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slayer_jax.io.hf import load_hf, save_hf

    tok = make_tokenizer(add_bos=add_bos)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, initializer_range=std)
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        params, jcfg, _ = load_hf(d, progress=False)
    save_hf(params, jcfg, out_dir, tokenizer=tok, overwrite=True, progress=False)
    return Path(out_dir)


def copy_json_corpus(out_dir, limit: int | None = None) -> Path:
    """A small real code corpus: the standard library's json package sources, copied to ``out_dir``."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(json.__file__).parent.glob("*.py"))[:limit]:
        shutil.copy(p, out / p.name)
    return out


def make_smollm2_tiny_run(work, smollm2_dir) -> Path:
    """A tiny random Llama (4 layers, width 32) with SmolLM2's real tokenizer at ``work/model``, and
    the json corpus at ``work/corpus``: the setup of the end-to-end training-run tests."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(work)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(smollm2_dir) / f).exists():
            shutil.copy(Path(smollm2_dir) / f, work / "model" / f)
    copy_json_corpus(work / "corpus")
    return work
