"""Llama SLayer-8B-Instruct style SFT: instruction tuning of an expanded model, all parameters,
LLaMA Pro's SFT settings (LR 2e-5, batch 128, sequence 4096). Loss only on assistant tokens
(the chat template's prompt and assistant header are masked).

Defaults run here on SmolLM2 with a local chat JSONL ({"messages": [{"role", "content"}...]}):

    slayer train --config configs/sft_slayer_instruct.py --config.data.source=chats.jsonl \\
                 --config.model=runs/smollm2_slayer/hf
"""

from slayer_jax.training.configs import base_config


def get_config():
    c = base_config()
    c.model = "default"  # point at the continually pretrained SLayer model's HF export
    c.model_config = "smollm2_135m"
    c.workdir = "runs/sft_slayer_instruct"
    c.export_dir = "runs/sft_slayer_instruct/hf"
    c.full_finetune = True  # the paper's Instruct variant tunes all parameters
    c.plan.kind = "none"
    c.steps = 100
    c.batch_size = 8
    c.data.mode = "sft"
    c.data.seq_len = 512
    c.optim.peak_lr = 2e-5
    c.optim.warmup_frac = 0.03
    return c
