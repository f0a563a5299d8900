"""slayer_jax: knowledge injection into pretrained Llama-family models, in JAX/Flax."""

__version__ = "0.1.0"
