"""LLaMA Pro 8B (Wu et al., ACL 2024): the uniform baseline on Llama-2-7B.

- 8 new blocks, split = 32 // 8 = 4: a copy of each of layers 3, 7, ..., 31 with o_proj and
  down_proj zeroed, inserted after it (new indices 4, 9, ..., 39 of 40). No pruning.
- Train only the new blocks; same optimizer, data and schedule as configs/slayer_llama2_7b.py.
"""

from slayer_jax.configs import base_config


def get_config():
    c = base_config()
    c.model = "meta-llama/Llama-2-7b-hf"
    c.model_config = "llama2_7b"
    c.workdir = "runs/llama_pro_llama2_7b"
    c.export_dir = "runs/llama_pro_llama2_7b/hf"
    c.steps = 15900
    c.batch_size = 1024
    c.grad_accum = 64  # 16 rows per microbatch (4 per device on v5p-8)
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    c.remat = "full"
    c.mesh = "data=1,fsdp=-1,tensor=1"
    c.plan.kind = "uniform"
    c.plan.expand = 8
    c.plan.init = "copy"
    c.data.seq_len = 4096
    c.data.mixture = ("EleutherAI/proof-pile-2:algebraic-stack,open-web-math,arxiv@1.0;"
                      "bigcode/the-stack-dedup:data/python@1.5")
    c.checkpoint.every = 500
    return c
