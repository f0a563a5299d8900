"""S strategy on Llama-3-8B (32 layers, GQA 32/8, vocab 128256): the paper's plan unchanged,
8 averaged identity blocks after 1, 3, ..., 15, prune 30 and 31, refresh the new last layer."""

from slayer_jax.configs import base_config


def get_config():
    c = base_config()
    c.model = "meta-llama/Meta-Llama-3-8B"
    c.model_config = "llama3_8b"
    c.workdir = "runs/slayer_llama3_8b"
    c.export_dir = "runs/slayer_llama3_8b/hf"
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
