"""SmolLM2-135M-Instruct, S strategy, continual pretraining on a local corpus: the small
default recipe that runs on a 2-core CPU.

SmolLM2 has 30 layers. The paper adds 8 blocks to 32 layers, one after every other layer of
the first half (after 1, 3, ..., 15). The same spacing on 30 layers (split = 15 // 7 = 2)
gives 7 blocks, after 1, 3, ..., 13: 23% new depth against the paper's 25%. Pruning is off:
removing SmolLM2's two deepest layers multiplies its general-text perplexity about 50x
(see docs/importance.md), unlike Llama-2-7B, where the paper found it harmless.

    slayer train --config configs/smollm2_slayer.py --config.data.source=PATH [--config.steps=200]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "default"  # HF dir, .gguf, slayer checkpoint, or "default" (SmolLM2-135M-Instruct)
    c.workdir = "runs/smollm2_slayer"
    c.export_dir = "runs/smollm2_slayer/hf"
    c.seed = 0
    c.steps = 200
    c.batch_size = 8  # global, in rows of seq_len tokens
    c.grad_accum = 1
    c.dtype = "float32"  # compute dtype; master weights are always fp32
    c.remat = "none"  # none | full | save_dots
    c.mesh = "data=-1"  # data=..,fsdp=..,tensor=..; one axis may be -1
    c.full_finetune = False
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 4

    c.plan = ml_collections.ConfigDict()
    c.plan.kind = "shallow"  # none | shallow | uniform | file
    c.plan.expand = 7
    c.plan.prune = 0
    c.plan.prune_mode = "deepest"  # deepest | keep_last
    c.plan.prune_layers = ()  # explicit original indices, overrides prune/prune_mode
    c.plan.refresh_last = False
    c.plan.init = "average"
    c.plan.file = ""
    c.plan.train_head = False

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # .txt / dir / .jsonl / .parquet / datasets name
    c.data.eval_source = ""
    c.data.mode = "text"  # text | sft
    c.data.field = ""
    c.data.seq_len = 512

    c.optim = ml_collections.ConfigDict()  # LLaMA Pro defaults
    c.optim.peak_lr = 2e-4
    c.optim.warmup_frac = 0.06
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.resume = True
    c.checkpoint.hash_base = True
    return c
