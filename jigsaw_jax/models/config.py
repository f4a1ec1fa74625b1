"""Model hyper-parameters as frozen (hashable) dataclasses.

Frozen dataclasses rather than ConfigDicts because flax modules take them as static attributes:
they must hash, and a model's shape must never change after construction. Experiment configs
(ml_collections) name a preset and override fields; `presets.py` turns that into these objects.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from jigsaw_jax.models.adapters.config import AdapterConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower (a ViT with a 2x2 patch merger)."""

  # "qwen2_5_vl": RMSNorm + SwiGLU blocks, window attention; "qwen2_vl": LayerNorm + GELU, full attention;
  # "qwen3_vl": LayerNorm + GELU, full attention, learned position embeddings and DeepStack
  # (jigsaw_jax/models/qwen3_vl).
  kind: str = "qwen2_5_vl"
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 2048
  # Qwen2.5-VL only: attention inside windows of `window_size` pixels, except at these blocks.
  window_size: int = 112
  fullatt_block_indexes: Tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  # Std of the normal draw of every weight matrix at random init (HF's `initializer_range`).
  initializer_range: float = 0.02
  # Qwen3-VL only: a learned square table of position embeddings, resampled to each image's
  # grid, and the blocks whose outputs (merged) are added to the first decoder layers' outputs.
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: Tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A Qwen2 / LLaMA-style decoder. `mrope_section=None` means plain 1-D RoPE."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: Optional[Tuple[int, ...]] = (16, 24, 24)
  qkv_bias: bool = True
  # Qwen3: RMSNorm over head_dim on every query and key head, before the rotation.
  qk_norm: bool = False
  # Qwen3-VL's M-RoPE: frequencies cycle t, h, w (h and w each take `mrope_section` of them)
  # instead of three contiguous blocks.
  mrope_interleaved: bool = False
  tie_word_embeddings: bool = True
  hidden_act: str = "silu"
  # Std of the normal draw of every weight matrix and the embedding at random init (HF's name).
  initializer_range: float = 0.02


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The multimodal policy: vision tower (optional) + text decoder + special token ids."""

  text: TextConfig = TextConfig()
  # Or an internvl.config.InternVisionConfig (kind 'internvl'): InternViT + pixel shuffle.
  vision: Optional[VisionConfig] = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialise each decoder / vision block in the backward pass (saves activation memory).
  remat: bool = False
  # "xla": plain einsum attention; "cudnn": jax.nn.dot_product_attention (fused kernel on GPU).
  attention_impl: str = "xla"
  # Trainable adapters on the text decoder (LoRA / MoE-LoRA / GraphMoE); None: the plain model.
  adapter: Optional[AdapterConfig] = None
