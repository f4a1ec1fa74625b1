"""jigsaw_jax: rule-based visual reinforcement learning of multimodal LLMs in JAX/Flax."""

__version__ = "0.1.0"
