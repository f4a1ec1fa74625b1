"""Static token layout of the vision tower: 2-D rotary positions, attention segments, windows.

The Qwen2-VL image processor emits the patches of each image (and each video frame) in
"merge-block" order: the 2x2 (spatial_merge_size**2) patches that the PatchMerger later fuses into
one LLM token are consecutive. Everything the tower needs to know about that layout (where each
patch sits in its image, which patches may attend to which) depends only on `grid_thw`, which we
keep static. So it is computed here with numpy at trace time and enters the jitted model as
constant index tables with fixed shapes.

Attention in the reference is "packed": one long token sequence cut into segments by
`cu_seqlens` (one per frame for full attention; one per window for Qwen2.5-VL window attention).
We express a segment split as a `SegmentTable`: gather the tokens into a padded
`[num_segments, max_len]` batch, attend per row with padded keys masked, scatter back. That is
static-shaped and costs O(N * max_len) instead of the O(N^2) of a block-diagonal mask over the
whole packed sequence (a batch of images at full attention, or many small windows).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

Grid = Tuple[Tuple[int, int, int], ...]


def normalize_grid(grid_thw) -> Grid:
  """Turns `grid_thw` (tuple/list/numpy of (t, h, w) rows) into a hashable tuple of int triples."""
  try:
    grid = tuple(tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3).tolist())
  except Exception as e:  # a jax tracer cannot become Python ints
    raise TypeError(
        "grid_thw must be static (a tuple of (t, h, w) ints, e.g. ((1, 28, 28),)) so that the "
        f"vision tower's shapes are known at trace time; got {type(grid_thw).__name__}. Pass it as "
        "a static argument of jax.jit (static_argnames / functools.partial), not as a traced array."
    ) from e
  if not grid:
    raise ValueError("grid_thw is empty: expected at least one (t, h, w) row.")
  return grid


def check_grid(grid: Grid, spatial_merge_size: int) -> None:
  """Raises a ValueError unless every image's h and w are positive multiples of the merge size."""
  for i, (t, h, w) in enumerate(grid):
    if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
      raise ValueError(
          f"grid_thw[{i}] = {(t, h, w)}: expected t >= 1 and h, w positive multiples of "
          f"spatial_merge_size={spatial_merge_size} (the Qwen2-VL processor resizes images so that "
          "they are); resize the image or use the processor's grid."
      )


def num_patches(grid: Grid) -> int:
  return sum(t * h * w for t, h, w in grid)


# ---------------------------------------------------------------------------------------------
# 2-D rotary embedding.
# ---------------------------------------------------------------------------------------------


def patch_positions(grid: Grid, spatial_merge_size: int) -> np.ndarray:
  """(row, col) of every patch inside its image, in the processor's merge-block order.

  Returns:
    int32 `[num_patches, 2]`; frames of a video repeat the same positions.
  """
  m = spatial_merge_size
  out = []
  for t, h, w in grid:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]: the m x m block of one LLM token is contiguous.
    to_blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    frame = np.stack([to_blocks(rows), to_blocks(cols)], axis=-1)
    out.append(np.tile(frame, (t, 1)))
  return np.concatenate(out, axis=0).astype(np.int32)


def rotary_cos_sin(positions: jnp.ndarray, head_dim: int, theta: float):
  """cos/sin tables of the axial 2-D RoPE.

  A quarter of the head's frequencies rotate with the row, a quarter with the column; the result
  is laid out [row freqs, col freqs] twice so that `rotate_half` pairs dimension i with
  i + head_dim/2, as in the reference (no partial rotation).

  Args:
    positions: int `[N, 2]` (row, col).
  Returns:
    cos, sin: float32 `[N, head_dim]`.
  """
  if head_dim % 4:
    raise ValueError(f"vision head_dim={head_dim} must be divisible by 4 for the 2-D rotary embedding.")
  spatial_dim = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
  angles = angles.reshape(angles.shape[0], -1)  # [N, head_dim/2]: rows then cols
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates `x` `[N, heads, head_dim]` in float32 (as the reference does) and returns x's dtype."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos[:, None, :] + rotated * sin[:, None, :]
  return out.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Attention segments.
# ---------------------------------------------------------------------------------------------


def frame_cu_seqlens(grid: Grid) -> np.ndarray:
  """Segment boundaries of full attention: every frame of every image attends only to itself."""
  lengths = [h * w for t, h, w in grid for _ in range(t)]
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def window_index(grid: Grid, spatial_merge_size: int, window_size: int, patch_size: int):
  """Qwen2.5-VL's window permutation (`get_window_index` in transformers).

  Each frame's grid of LLM tokens (merged m x m patch blocks) is cut into windows of
  `window_size // (m * patch_size)` tokens per side, starting top-left; windows at the bottom and
  right edges are smaller when the grid does not divide (the reference pads with -100 and drops
  the padding; empty windows vanish).

  Returns:
    window_idx: int `[num_llm_tokens]`: LLM-token index (processor order) at each position of
      the window-ordered sequence.
    cu_window_seqlens: int `[num_windows + 1]`: window boundaries in *patches* (not LLM tokens).
  """
  m = spatial_merge_size
  side = window_size // m // patch_size
  if side < 1:
    raise ValueError(
        f"window_size={window_size} is smaller than one LLM token ({m} x {patch_size} = "
        f"{m * patch_size} pixels); expected window_size >= spatial_merge_size * patch_size."
    )
  order, lengths, offset = [], [], 0
  for t, h, w in grid:
    gh, gw = h // m, w // m
    nh, nw = -(-gh // side), -(-gw // side)
    for frame in range(t):
      index = offset + frame * gh * gw + np.arange(gh * gw).reshape(gh, gw)
      padded = np.full((nh * side, nw * side), -1, dtype=np.int64)
      padded[:gh, :gw] = index
      # [nh, side, nw, side] -> [nh, nw, side, side]: one row per window, raster order inside.
      windows = padded.reshape(nh, side, nw, side).transpose(0, 2, 1, 3).reshape(nh * nw, -1)
      for win in windows:
        win = win[win >= 0]
        order.append(win)
        lengths.append(len(win) * m * m)
    offset += t * gh * gw
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return np.concatenate(order), cu


@dataclasses.dataclass(frozen=True)
class SegmentTable:
  """Index tables that run packed, segment-restricted attention as a padded batch.

  Attributes:
    gather: int32 `[num_segments, max_len]`: token index at each padded slot (padding -> 0).
    lengths: int32 `[num_segments]`: real tokens per segment; slots >= length are padding.
    scatter: int32 `[num_tokens]`: flat slot (`segment * max_len + j`) holding each token.
  """

  gather: np.ndarray
  lengths: np.ndarray
  scatter: np.ndarray

  @property
  def is_padded(self) -> bool:
    return bool((self.lengths < self.gather.shape[1]).any())


def segment_table(token_order: np.ndarray, cu_seqlens: np.ndarray) -> SegmentTable:
  """Segments `token_order[cu[s]:cu[s+1]]` for each s.

  Args:
    token_order: int `[N]`, a permutation of the tokens (identity for frame segments).
    cu_seqlens: int `[S + 1]` boundaries into `token_order`, starting at 0 and ending at N.
  """
  lengths = np.diff(cu_seqlens)
  if (lengths <= 0).any() or cu_seqlens[0] != 0 or cu_seqlens[-1] != len(token_order):
    raise ValueError(f"bad segment boundaries {cu_seqlens.tolist()} for {len(token_order)} tokens.")
  max_len = int(lengths.max())
  gather = np.zeros((len(lengths), max_len), dtype=np.int32)
  scatter = np.zeros(len(token_order), dtype=np.int32)
  for s, (start, length) in enumerate(zip(cu_seqlens[:-1], lengths)):
    tokens = token_order[start:start + length]
    gather[s, :length] = tokens
    scatter[tokens] = s * max_len + np.arange(length)
  return SegmentTable(gather=gather, lengths=lengths.astype(np.int32), scatter=scatter)


def full_attention_table(grid: Grid) -> SegmentTable:
  return segment_table(np.arange(num_patches(grid)), frame_cu_seqlens(grid))


def window_attention_table(
    grid: Grid, spatial_merge_size: int, window_size: int, patch_size: int
) -> SegmentTable:
  """Window segments over patches: each LLM token of `window_index` expands to its m*m patches."""
  llm_order, cu = window_index(grid, spatial_merge_size, window_size, patch_size)
  unit = spatial_merge_size**2
  patch_order = (llm_order[:, None] * unit + np.arange(unit)).reshape(-1)
  return segment_table(patch_order, cu)


def windowed_block(layer: int, kind: str, fullatt_block_indexes: Sequence[int]) -> bool:
  """Whether block `layer` attends within windows (Qwen2.5-VL, outside the full-attention blocks)."""
  return kind == "qwen2_5_vl" and layer not in fullatt_block_indexes
