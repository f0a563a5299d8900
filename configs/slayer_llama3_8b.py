"""S strategy on Llama-3-8B (32 layers, GQA 32/8, vocab 128256): the paper's plan unchanged,
8 averaged identity blocks after 1, 3, ..., 15, prune 30 and 31, refresh the new last layer."""

from slayer_jax.training.configs import base_config, paper_scale


def get_config():
    c = paper_scale(base_config(), "slayer_llama3_8b", "meta-llama/Meta-Llama-3-8B", "llama3_8b")
    c.plan.kind = "shallow"
    c.plan.expand = 8
    c.plan.prune = 2
    c.plan.refresh_last = True
    return c
