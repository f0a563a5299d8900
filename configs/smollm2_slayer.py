"""SmolLM2-135M-Instruct, S strategy, continual pretraining on a local corpus: the small
default recipe that runs on a 2-core CPU.

SmolLM2 has 30 layers. The paper adds 8 blocks to 32 layers, one after every other layer of
the first half (after 1, 3, ..., 15). The same spacing on 30 layers (split = 15 // 7 = 2)
gives 7 blocks, after 1, 3, ..., 13: 23% new depth against the paper's 25%. Pruning is off:
removing SmolLM2's two deepest layers multiplies its general-text perplexity about 50x
(see docs/importance.md), unlike Llama-2-7B, where the paper found it harmless.

    slayer train --config configs/smollm2_slayer.py --config.data.source=PATH [--config.steps=200]
"""

from slayer_jax.training.configs import base_config


def get_config():
    c = base_config()
    c.model = "default"
    c.model_config = "smollm2_135m"
    c.workdir = "runs/smollm2_slayer"
    c.export_dir = "runs/smollm2_slayer/hf"
    c.steps = 200
    c.batch_size = 8
    c.data.seq_len = 512
    c.plan.kind = "shallow"
    c.plan.expand = 7
    c.plan.prune = 0
    return c
