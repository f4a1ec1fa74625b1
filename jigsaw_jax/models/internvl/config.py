"""InternVL's vision side as a frozen dataclass: the InternViT tower, pixel shuffle, projector.

It fills `ModelConfig.vision` (dispatch on `kind == "internvl"`); the language model is our
TextConfig with plain 1-D RoPE (`mrope_section=None`), which is what transformers' InternVL runs
for its Qwen2 language models. Field names follow transformers' InternVLVisionConfig and
InternVLConfig so the HF import reads one-to-one.
"""

from __future__ import annotations

import dataclasses

KIND = "internvl"


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
  """InternViT (transformers' InternVLVisionModel) + pixel shuffle + InternVLMultiModalProjector."""

  kind: str = KIND
  depth: int = 24  # num_hidden_layers
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_heads: int = 16
  in_channels: int = 3
  image_size: int = 448  # every tile is image_size x image_size pixels
  patch_size: int = 14
  # "layer_norm" (InternViT-300M) or "rms_norm" (InternViT-6B).
  norm_type: str = "layer_norm"
  layer_norm_eps: float = 1e-6
  use_qk_norm: bool = False
  attention_bias: bool = True
  hidden_act: str = "gelu"
  # True: no final norm after the encoder (the reference's `layernorm` is an identity).
  use_mean_pooling: bool = True
  # Pixel shuffle: each (1/ratio)^2 block of patch features becomes one token of 4x the width.
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  out_hidden_size: int = 1536  # the language model's hidden size
  initializer_range: float = 0.02

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def shuffle(self) -> int:
    """Side of the block of patches that pixel shuffle joins into one token (2 for ratio 0.5)."""
    return int(round(1 / self.downsample_ratio))

  @property
  def tokens_per_tile(self) -> int:
    """Image-context tokens per tile: the processor's image_seq_length (256 for 448 / 14 / 2)."""
    return (self.patches_per_side // self.shuffle) ** 2

  @property
  def tile_dim(self) -> int:
    """Length of one row of pixel_values: a whole tile, channels first (C * H * W)."""
    return self.in_channels * self.image_size ** 2

  def check(self) -> None:
    if self.kind != KIND:
      raise ValueError(f"InternVisionConfig.kind must be {KIND!r}, got {self.kind!r}.")
    if self.norm_type not in ("layer_norm", "rms_norm"):
      raise ValueError(f"norm_type {self.norm_type!r}: expected 'layer_norm' or 'rms_norm'.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size "
                       f"{self.patch_size}.")
    if self.patches_per_side % self.shuffle or abs(1 / self.shuffle - self.downsample_ratio) > 1e-9:
      raise ValueError(
          f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
          f"{self.patches_per_side} patches per side of a tile.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads "
                       f"{self.num_heads}.")
