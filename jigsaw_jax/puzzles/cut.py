"""Cutting an image into an m x n grid, shuffling the patches, and putting them back.

Pure numpy: every function takes its randomness as an explicit `np.random.Generator`.
Positions are 1-based and row-major (1 is top-left, m*n bottom-right), as in Jigsaw-R1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def crop_to_grid(image: np.ndarray, m: int, n: int) -> np.ndarray:
  """Trims the right and bottom edges so that the height divides by m and the width by n."""
  height, width = image.shape[:2]
  if height < m or width < n:
    raise ValueError(
        f"An image of {height}x{width} pixels (HxW) cannot be cut into {m}x{n} patches: "
        f"it needs at least {m} rows and {n} columns of pixels.")
  return image[: (height // m) * m, : (width // n) * n]


def _patch_slices(height: int, width: int, m: int, n: int, index: int):
  patch_h, patch_w = height // m, width // n
  row, col = divmod(index, n)
  return (slice(row * patch_h, (row + 1) * patch_h), slice(col * patch_w, (col + 1) * patch_w))


def shuffle_patches(image: np.ndarray, m: int, n: int, rng: np.random.Generator):
  """Shuffles the patches of a grid-divisible image into one composite of the same size.

  Nothing is drawn on the composite (no numbers, no lines): the model learns the layout from the
  prompt text only.

  Returns:
    (composite, forward) where forward[new - 1] = original position (1-based) of the patch now at
    position `new`; the reference calls this `patches_forward`. The identity is not excluded.
  """
  height, width = image.shape[:2]
  if height % m or width % n:
    raise ValueError(f"Image of {height}x{width} is not divisible into {m}x{n}; crop it first.")
  forward = rng.permutation(m * n) + 1
  composite = np.empty_like(image)
  for new in range(m * n):
    composite[_patch_slices(height, width, m, n, new)] = image[
        _patch_slices(height, width, m, n, int(forward[new]) - 1)]
  return composite, tuple(int(x) for x in forward)


def reassemble(composite: np.ndarray, m: int, n: int, forward: Sequence[int]) -> np.ndarray:
  """Inverse of `shuffle_patches`: puts every patch back at its original position."""
  height, width = composite.shape[:2]
  restored = np.empty_like(composite)
  for new, original in enumerate(forward):
    restored[_patch_slices(height, width, m, n, original - 1)] = composite[
        _patch_slices(height, width, m, n, new)]
  return restored


def backward_from_forward(forward: Sequence[int]) -> tuple[int, ...]:
  """patches_backward[original - 1] = current position of that patch (1-based)."""
  backward = [0] * len(forward)
  for new, original in enumerate(forward, start=1):
    backward[original - 1] = new
  return tuple(backward)


def mask_borders(image: np.ndarray, m: int, n: int, mask_ratio: float) -> np.ndarray:
  """Blacks out bands along the patch borders, as the reference's `mask_image` does.

  Outer borders lose `int(size * ratio)` pixels, inner borders half of that on each side, and the
  bands run across the whole image (a band of one patch row masks that row in every column).
  """
  if mask_ratio <= 0:
    return image
  height, width = image.shape[:2]
  patch_h, patch_w = height // m, width // n
  band_h, band_w = int(patch_h * mask_ratio), int(patch_w * mask_ratio)
  out = image.copy()
  for i in range(m):
    top, bottom = i * patch_h, (i + 1) * patch_h
    out[top: top + (band_h if i == 0 else band_h // 2)] = 0
    out[bottom - (band_h if i == m - 1 else band_h // 2): bottom] = 0
  for j in range(n):
    left, right = j * patch_w, (j + 1) * patch_w
    out[:, left: left + (band_w if j == 0 else band_w // 2)] = 0
    out[:, right - (band_w if j == n - 1 else band_w // 2): right] = 0
  return out
