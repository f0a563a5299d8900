"""Llama SLayer 8B, exactly as in the paper (Chen et al., Findings of EMNLP 2024).

- Base: Llama-2-7B, 32 layers.
- Expand: 8 averaged identity blocks, one after each of original layers 1, 3, ..., 15 (new
  indices 2, 5, ..., 23 of 40); o_proj and down_proj zeroed.
- Prune: the 2 deepest layers (30, 31): 40 -> 38 layers, ~7.95B parameters.
- Train: the 8 new blocks and the refreshed new last layer (old layer 29, re-initialised as
  the average of layers 29 and 30): 9 blocks; embeddings, final norm, LM head frozen.
- Optimizer: LLaMA Pro's recipe: peak LR 2e-4, 6% warmup + cosine, weight decay 0.1, clip 1.0,
  bf16, sequence 4096, global batch 1024, 15,900 steps (~80B tokens).
- Corpus (code + math, as LLaMA Pro): Proof-Pile-2 (EleutherAI/proof-pile-2: algebraic-stack,
  open-web-math, arxiv; 55B tokens) and The-Stack-Dedup Python (bigcode/the-stack-dedup,
  data/python; 22B tokens, mixture weight 1.5; settings in slayer_jax.training.configs.paper_scale). Prepare each corpus
  once with `slayer data prepare`, then list them with their weights in `data.source`.

    slayer plan  --config configs/slayer_llama2_7b.py --mesh data=1,fsdp=4,tensor=1 --device v5p-8
    # v5e (16 GiB a chip): keep the compiler's collective matmuls from allocating every layer's
    # outputs ahead (the TPU compiler's estimate: fits a v5litepod-8; 61.6% headroom on a v5litepod-16;
    # bench/RESULTS.md)
    slayer plan  --config configs/slayer_llama2_7b.py --device v5litepod-16 \\
                 --config.libtpu_flags=--xla_tpu_enable_windowed_einsum_for_all_gather=false
    slayer data prepare /data/proof-pile-2 --tokenizer /path/to/Llama-2-7b-hf --seq-len 4096 --out gs://b/pp2
    slayer data prepare /data/stack-python --tokenizer /path/to/Llama-2-7b-hf --seq-len 4096 --out gs://b/py
    slayer train --config configs/slayer_llama2_7b.py --config.model=/path/to/Llama-2-7b-hf \\
                 --config.data.source="gs://b/pp2@1.0;gs://b/py@1.5" --config.workdir=gs://b/runs/slayer
"""

from slayer_jax.training.configs import base_config, paper_scale


def get_config():
    c = paper_scale(base_config(), "slayer_llama2_7b", "meta-llama/Llama-2-7b-hf", "llama2_7b")
    c.plan.kind = "shallow"
    c.plan.expand = 8
    c.plan.prune = 2
    c.plan.prune_mode = "deepest"
    c.plan.refresh_last = True
    c.plan.init = "average"
    return c
