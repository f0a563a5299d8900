"""LLaMA Pro 8B (Wu et al., ACL 2024): the uniform baseline on Llama-2-7B.

- 8 new blocks, split = 32 // 8 = 4: a copy of each of layers 3, 7, ..., 31 with o_proj and
  down_proj zeroed, inserted after it (new indices 4, 9, ..., 39 of 40). No pruning.
- Train only the new blocks; same optimizer, data and schedule as configs/slayer_llama2_7b.py.
"""

from slayer_jax.training.configs import base_config, paper_scale


def get_config():
    c = paper_scale(base_config(), "llama_pro_llama2_7b", "meta-llama/Llama-2-7b-hf", "llama2_7b")
    c.plan.kind = "uniform"
    c.plan.expand = 8
    c.plan.init = "copy"
    return c
