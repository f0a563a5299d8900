"""S strategy on Mistral-7B-v0.1 (32 layers, GQA 32/8, sliding window 4096), which the paper
uses to show the method generalises: 8 averaged identity blocks in the first half, prune 2."""

from slayer_jax.configs import base_config


def get_config():
    c = base_config()
    c.model = "mistralai/Mistral-7B-v0.1"
    c.model_config = "mistral_7b"
    c.workdir = "runs/slayer_mistral_7b"
    c.export_dir = "runs/slayer_mistral_7b/hf"
    c.steps = 15900
    c.batch_size = 1024
    c.grad_accum = 64  # 16 rows per microbatch (4 per device on v5p-8)
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    c.remat = "full"
    c.mesh = "data=1,fsdp=-1,tensor=1"
    c.plan.kind = "shallow"
    c.plan.expand = 8
    c.plan.prune = 2
    c.plan.refresh_last = True
    c.data.seq_len = 4096
    c.checkpoint.every = 500
    return c
