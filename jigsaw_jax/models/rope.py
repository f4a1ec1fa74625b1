"""Rotary position embeddings for the text decoder: plain 1-D RoPE and Qwen's multimodal M-RoPE.

M-RoPE gives every token three position ids (temporal, height, width). The rotary frequencies are
split into three contiguous sections (`mrope_section`, counted in frequency pairs, e.g. (16, 24, 24)
for head_dim 128); section i rotates with the i-th position id. Qwen3-VL interleaves them instead
(`interleaved=True`): frequency j takes h when j % 3 == 1, w when j % 3 == 2 (while j < 3 * that
axis's section) and t otherwise, so every axis spans low and high frequencies. Text tokens carry
the same id on all three axes, so for pure text M-RoPE reduces exactly to 1-D RoPE.

The layout follows the reference (transformers' `rotate_half` convention): the first half of the
head dimension pairs with the second half, and cos/sin are the per-frequency values repeated twice.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """1 / theta^(2i/d) for i < d/2, in float32 as the reference computes it."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exponents)


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: Optional[Sequence[int]] = None,
    interleaved: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """cos and sin tables, each float32 [B, L, head_dim].

  Args:
    positions: int [B, L] (1-D RoPE, or text-only M-RoPE) or [3, B, L] (M-RoPE: t, h, w).
    head_dim: size of one attention head.
    theta: RoPE base.
    mrope_section: frequency pairs per axis (sums to head_dim // 2); None for 1-D RoPE.
    interleaved: Qwen3-VL's layout of the M-RoPE axes over the frequencies (see above).
  """
  inv_freq = inverse_frequencies(head_dim, theta)  # [D/2]
  if mrope_section is None:
    if positions.ndim != 2:
      raise ValueError(
          f"1-D RoPE expects positions of shape [B, L], got {positions.shape}; this config has "
          "mrope_section=None, so pass one position id per token.")
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  else:
    if sum(mrope_section) != head_dim // 2:
      raise ValueError(
          f"mrope_section {tuple(mrope_section)} must sum to head_dim // 2 = {head_dim // 2}.")
    if positions.ndim == 2:  # Text only: the three axes share one id.
      positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
    if positions.ndim != 3 or positions.shape[0] != 3:
      raise ValueError(f"M-RoPE expects positions of shape [3, B, L], got {positions.shape}.")
    freqs3 = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, D/2]
    axis_of = mrope_axes(mrope_section, interleaved)
    pair = np.arange(head_dim // 2)
    freqs = jnp.moveaxis(freqs3[axis_of, :, :, pair], 0, -1)  # [B, L, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, D]
  return jnp.cos(emb), jnp.sin(emb)


def mrope_axes(mrope_section: Sequence[int], interleaved: bool = False) -> np.ndarray:
  """The axis (0: t, 1: h, 2: w) whose position id rotates each frequency pair, int [D/2]."""
  if not interleaved:  # Contiguous sections; section i -> axis i % 3.
    return np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
  if len(mrope_section) != 3:
    raise ValueError(f"interleaved M-RoPE needs three sections (t, h, w), got {tuple(mrope_section)}.")
  j = np.arange(sum(mrope_section))
  axis_of = np.zeros_like(j)
  for axis in (1, 2):
    axis_of[(j % 3 == axis) & (j < 3 * mrope_section[axis])] = axis
  return axis_of


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, H, D] by cos/sin [B, L, D]; computed in float32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
