"""The Qwen3-VL vision tower in Flax linen, numerically equal to transformers' Qwen3VLVisionModel.

    pixel_values [N, C*T*P*P] --patch_embed (+bias)--> [N, E] + resampled learned positions
        --blocks x depth (LayerNorm, GELU MLP, full attention per frame, 2-D RoPE)--> [N, E]
        --merger--> [N/m^2, out]      and, after each block in `deepstack_visual_indexes`,
        --deepstack merger k--> [N/m^2, out]: DeepStack features for decoder layer k

The blocks and the main merger are the Qwen2-VL ones of `models/vision.py` (kind "qwen3_vl" takes
their LayerNorm + fc1/fc2 branch); what is new is the learned position table, resampled to each
image's grid by bilinear interpolation with aligned corners, and the DeepStack mergers, which
normalise after gathering the m*m patches of a token (the main merger normalises before).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import vision, vision_rope
from jigsaw_jax.models.config import VisionConfig

# transformers hard-codes this epsilon for every LayerNorm of the tower and its mergers.
LAYER_NORM_EPS = 1e-6


class VisionFeatures(NamedTuple):
  merged: jax.Array  # [N/m^2, out]: the image tokens' embeddings
  deepstack: Tuple[jax.Array, ...]  # one [N/m^2, out] per deepstack index, in order


def interpolation_taps(grid: vision_rope.Grid, side: int, merge: int):
  """Bilinear (align_corners) taps of every patch into the `side` x `side` position table.

  Returns (index int32 [N, 4], weight float32 [N, 4]) in the processor's merge-block order; the
  arithmetic is float32 as in the reference, so the weights agree bit for bit.
  """
  rows_cols = vision_rope.patch_positions(grid, merge)
  sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grid])

  def axis(pos, size):
    src = pos.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)

  h_taps, h_weights = axis(rows_cols[:, 0], sizes[:, 0])
  w_taps, w_weights = axis(rows_cols[:, 1], sizes[:, 1])
  index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
  weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
  return index.astype(np.int32), weight


class DeepstackMerger(nn.Module):
  """m*m consecutive patches -> one token: LayerNorm over the gathered m*m*E values, Linear,
  GELU (erf), Linear."""

  out_hidden_size: int
  spatial_merge_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(vision._dense, dtype=self.dtype, param_dtype=self.param_dtype)
    merged = self.spatial_merge_size**2 * x.shape[-1]
    x = x.reshape(-1, merged)
    x = vision._norm("qwen3_vl", LAYER_NORM_EPS, "norm", self.dtype, self.param_dtype)(x)
    x = jax.nn.gelu(dense(merged, (None, "mlp"), name="linear_fc1")(x), approximate=False)
    x = dense(self.out_hidden_size, ("mlp", "embed"), name="linear_fc2")(x)
    return nn.with_logical_constraint(x, ("activation_length", "activation_embed"))


class Qwen3VisionTower(nn.Module):
  """Attributes as `vision.VisionTower`'s; `cfg.kind` must be 'qwen3_vl'."""

  cfg: VisionConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, grid_thw) -> VisionFeatures:
    """pixel_values [num_patches, C*T*P*P] and the static (t, h, w) per image, as the processor
    gives them; returns the merged tokens and the DeepStack features, image by image."""
    cfg = self.cfg
    check_config(cfg, self.attention_impl)
    dtype, param_dtype = vision._dtype(self.dtype), vision._dtype(self.param_dtype)
    grid = vision_rope.normalize_grid(grid_thw)
    vision_rope.check_grid(grid, cfg.spatial_merge_size)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    expected = (vision_rope.num_patches(grid), patch_dim)
    if tuple(pixel_values.shape) != expected:
      raise ValueError(
          f"pixel_values has shape {tuple(pixel_values.shape)}, expected {expected} for "
          f"grid_thw={grid}. Pass the processor's pixel_values with its image_grid_thw.")

    # The reference's Conv3d (kernel = stride = patch) with bias, as one matmul on cut patches.
    x = vision._dense(cfg.hidden_size, (None, "embed"), name="patch_embed", dtype=dtype,
                      param_dtype=param_dtype)(pixel_values.astype(dtype))
    table = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")),
        (cfg.num_position_embeddings, cfg.hidden_size), param_dtype)
    index, weight = interpolation_taps(grid, side_of(cfg), cfg.spatial_merge_size)
    taps = jnp.take(table, jnp.asarray(index), axis=0)  # [N, 4, E]
    positions = jnp.sum(taps * jnp.asarray(weight)[..., None], axis=1)
    x = nn.with_logical_constraint(x + positions.astype(x.dtype),
                                   ("activation_length", "activation_embed"))

    cos, sin = vision_rope.rotary_cos_sin(
        jnp.asarray(vision_rope.patch_positions(grid, cfg.spatial_merge_size)),
        cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
    frames = vision_rope.full_attention_table(grid)
    tables = (jnp.asarray(frames.gather), jnp.asarray(frames.lengths), jnp.asarray(frames.scatter))
    block_cls = nn.remat(vision.VisionBlock) if self.remat else vision.VisionBlock
    deepstack = []
    for i in range(cfg.depth):
      x = block_cls(cfg, self.attention_impl, frames.is_padded, dtype, param_dtype,
                    name=f"blocks_{i}")(x, cos, sin, *tables)
      if i in cfg.deepstack_visual_indexes:
        k = cfg.deepstack_visual_indexes.index(i)
        deepstack.append(DeepstackMerger(cfg.out_hidden_size, cfg.spatial_merge_size, dtype,
                                         param_dtype, name=f"deepstack_{k}")(x))
    merged = vision.PatchMerger(cfg.kind, cfg.out_hidden_size, cfg.spatial_merge_size,
                                LAYER_NORM_EPS, dtype, param_dtype, name="merger")(x)
    return VisionFeatures(merged, tuple(deepstack))


def side_of(cfg: VisionConfig) -> int:
  """Side of the square learned position table."""
  return int(round(cfg.num_position_embeddings ** 0.5))


def check_config(cfg: VisionConfig, attention_impl: str = "xla") -> None:
  if cfg.kind != "qwen3_vl":
    raise ValueError(f"the Qwen3-VL tower needs VisionConfig.kind='qwen3_vl', got {cfg.kind!r}.")
  if attention_impl not in vision.ATTENTION_IMPLS:
    raise ValueError(
        f"attention_impl={attention_impl!r}: expected one of {vision.ATTENTION_IMPLS}.")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(
        f"vision hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}.")
  if side_of(cfg) ** 2 != cfg.num_position_embeddings:
    raise ValueError(f"num_position_embeddings={cfg.num_position_embeddings} must be a square "
                     "(the learned table is side x side).")
  bad = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
  if bad or len(set(cfg.deepstack_visual_indexes)) != len(cfg.deepstack_visual_indexes):
    raise ValueError(f"deepstack_visual_indexes {cfg.deepstack_visual_indexes} must be distinct "
                     f"blocks of the {cfg.depth}.")
