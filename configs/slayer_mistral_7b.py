"""S strategy on Mistral-7B-v0.1 (32 layers, GQA 32/8, sliding window 4096), which the paper
uses to show the method generalises: 8 averaged identity blocks in the first half, prune 2."""

from slayer_jax.training.configs import base_config, paper_scale


def get_config():
    c = paper_scale(base_config(), "slayer_mistral_7b", "mistralai/Mistral-7B-v0.1", "mistral_7b")
    c.plan.kind = "shallow"
    c.plan.expand = 8
    c.plan.prune = 2
    c.plan.refresh_last = True
    return c
