"""Shared pytest settings: CPU only, no network, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after the environment is set)

# Parity against PyTorch in fp32 needs exact fp32 matmuls (XLA on CPU may otherwise use bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")
