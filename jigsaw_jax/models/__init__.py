"""The policy: Qwen2.5-VL / Qwen2-VL, InternVL (internvl/) and LLaMA-style text decoders in Flax
linen.

    cfg = models.get_preset("tiny")                      # or models.load_hf(dir) for a checkpoint
    params = models.init_params(cfg, jax.random.key(0))
    index = models.rope_index(cfg, input_ids, image_grid_thw, attn_mask)   # host, numpy
    out = models.VisionLanguageModel(cfg).apply(
        params, input_ids, index.positions, attn_mask, pixel_values, image_grid_thw)
    out.logits  # float32 [B, L, V]

See mllm.py (the model and its position ids), decoder.py (the decoder and its KV cache),
hf_io.py (HF checkpoints in and out) and parity.py (the check against transformers).
"""

from jigsaw_jax.models.config import ModelConfig, TextConfig, VisionConfig
from jigsaw_jax.models.decoder import (Cache, DecoderOutput, TextDecoder, cache_lengths,
                                       init_cache)
from jigsaw_jax.models.hf_io import CheckpointError, load_hf, model_config_from_hf, save_hf
from jigsaw_jax.models.mllm import (RopeIndex, VisionLanguageModel, abstract_params,
                                    decode_positions, init_params, logical_axes, rope_index)
from jigsaw_jax.models.presets import PRESETS, count_params, get_preset

__all__ = [
    "Cache", "CheckpointError", "DecoderOutput", "ModelConfig", "PRESETS", "RopeIndex",
    "TextConfig", "TextDecoder", "VisionConfig", "VisionLanguageModel", "abstract_params",
    "cache_lengths", "count_params", "decode_positions", "get_preset", "init_cache",
    "init_params", "load_hf", "logical_axes", "model_config_from_hf", "rope_index", "save_hf",
]
