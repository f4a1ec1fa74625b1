"""The training batch of one GRPO step: each prompt ONCE, and its G sampled completions.

A SequenceBatch holds the P prompts (left-padded ids, mask and M-RoPE positions [3, P, L], each
prompt's images once) and the R = P*G completions (right-padded to T, with their positions, which
continue each prompt at real tokens + j + its rope delta, exactly as decoding placed them). Row r
continues prompt r // group; a micro-batch cut through groups says which prompt each of its rows
continues (`prompt_index`) instead.

Scoring reads the prompts directly when the rows of a group share their prompt's forward pass
(rl/scoring.py `shared_prompt_scores`); the row-by-row pass builds the [R, L + T] rows inside the
jit (`expand_rows`: static gathers), so no prompt or image is ever repeated on the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch

Grid = Tuple[Tuple[int, int, int], ...]


class SequenceBatch(NamedTuple):
  prompt_ids: np.ndarray  # int32 [P, L], left-padded
  prompt_mask: np.ndarray  # int32 [P, L]
  prompt_positions: np.ndarray  # int32 [3, P, L]: M-RoPE ids, 0 at padding
  pixel_values: np.ndarray  # float32 [patches of the P prompts' images, in prompt order, D]
  completion: np.ndarray  # int32 [R, T]: the sampled tokens
  completion_mask: np.ndarray  # float32 [R, T]: 1 up to and including the first EOS
  completion_positions: np.ndarray  # int32 [3, R, T]
  grid: Grid  # static image grids of the P prompts, in prompt order
  group: int = 1  # rows g*G ... g*G + G-1 continue prompt g (static)
  prompt_index: Optional[Tuple[int, ...]] = None  # else: the prompt of each row (static)

  @property
  def prompt_length(self) -> int:
    return self.prompt_ids.shape[1]

  @property
  def rows(self) -> int:
    return self.completion.shape[0]

  @property
  def prompts(self) -> int:
    return self.prompt_ids.shape[0]

  def prompt_of_rows(self) -> np.ndarray:
    """int [R]: which prompt each row continues."""
    if self.prompt_index is not None:
      return np.asarray(self.prompt_index, np.int64)
    return np.arange(self.rows) // max(self.group, 1)

  def arrays(self) -> tuple:
    """The array fields, in order (pixels None without images): what jitted steps take."""
    return (self.prompt_ids, self.prompt_mask, self.prompt_positions,
            self.pixel_values if self.grid else None, self.completion, self.completion_mask,
            self.completion_positions)

  def layout(self) -> tuple:
    """The static fields (grid, group, prompt_index), hashable: what jitted steps specialise on."""
    return (tuple(self.grid), int(self.group), self.prompt_index)

  @classmethod
  def from_parts(cls, arrays, layout) -> "SequenceBatch":
    return cls(*arrays, *layout)


def build_sequences(cfg: ModelConfig, prompts: PromptBatch, completion: np.ndarray,
                    completion_mask: np.ndarray, group_size: int,
                    rope: Optional[mllm.RopeIndex] = None) -> SequenceBatch:
  """Each prompt (once) with its G completions. `rope`: the prompts' M-RoPE index if it was
  computed already (the rollout's); else it is computed here."""
  completion = np.asarray(completion, np.int32)
  completion_mask = np.asarray(completion_mask, np.float32)
  group = max(int(group_size), 1)
  ids = np.asarray(prompts.input_ids, np.int32)
  mask = np.asarray(prompts.attention_mask, np.int32)
  if ids.shape[0] * group != completion.shape[0]:
    raise ValueError(f"{ids.shape[0]} prompts x G={group} samples need {ids.shape[0] * group} "
                     f"completions, got {completion.shape[0]}.")
  if rope is None:
    rope = mllm.rope_index(cfg, ids, prompts.image_grid_thw, mask)
  # Completion tokens are text, whatever their id, and continue each prompt at (real prompt
  # tokens + j + delta), exactly as decoding placed them.
  start = np.repeat(mask.sum(1) + np.asarray(rope.deltas), group)
  tail = start[:, None] + np.arange(completion.shape[1])[None]
  grid = tuple(tuple(int(v) for v in g) for g in np.asarray(prompts.image_grid_thw).reshape(-1, 3))
  return SequenceBatch(ids, mask, np.asarray(rope.positions, np.int32),
                       np.asarray(prompts.pixel_values, np.float32), completion, completion_mask,
                       np.broadcast_to(tail, (3,) + tail.shape).astype(np.int32), grid, group)


def _images_per_prompt(batch: SequenceBatch) -> int:
  per = len(batch.grid) // batch.prompts if batch.prompts else 0
  if per * batch.prompts != len(batch.grid):
    raise ValueError("micro-batching needs the same number of images in every row.")
  return per


def _patch_offsets(grid: Grid) -> np.ndarray:
  return np.concatenate([[0], np.cumsum([int(np.prod(g)) for g in grid])]).astype(np.int64)


def split_rows(batch: SequenceBatch, num_splits: int):
  """Yields `num_splits` consecutive row blocks (micro-batches), each with the prompts its rows
  continue (once). Blocks of whole groups keep `group`; a block cut through a group shares
  nothing (group 1) and lists the prompt of each row (`prompt_index`)."""
  rows = batch.rows
  if rows % num_splits:
    raise ValueError(f"{rows} rows do not split into {num_splits} equal micro-batches; make "
                     "prompts_per_batch * group_size a multiple of the number of micro-batches.")
  size = rows // num_splits
  per = _images_per_prompt(batch)
  offsets = _patch_offsets(batch.grid)
  owner = batch.prompt_of_rows()
  whole = batch.prompt_index is None and size % batch.group == 0
  for i in range(num_splits):
    lo, hi = i * size, (i + 1) * size
    p_lo, p_hi = int(owner[lo]), int(owner[hi - 1]) + 1
    local = owner[lo:hi] - p_lo
    trivial = np.array_equal(local, np.arange(size))
    yield SequenceBatch(
        batch.prompt_ids[p_lo:p_hi], batch.prompt_mask[p_lo:p_hi],
        batch.prompt_positions[:, p_lo:p_hi],
        batch.pixel_values[offsets[p_lo * per]:offsets[p_hi * per]], batch.completion[lo:hi],
        batch.completion_mask[lo:hi], batch.completion_positions[:, lo:hi],
        batch.grid[p_lo * per:p_hi * per], batch.group if whole else 1,
        None if whole or trivial else tuple(int(p) for p in local))


def expand_rows(seq: SequenceBatch):
  """(input_ids, attn_mask, positions, pixel_values, grid) of every row, [R, L + T]: each row's
  prompt gathered (jnp, inside the jit) and joined with its completion. Row order, images
  included, is that of a batch whose prompts were repeated G times."""
  owner = seq.prompt_of_rows()
  same = np.array_equal(owner, np.arange(seq.rows)) and seq.prompts == seq.rows
  take = (lambda x, axis=0: x) if same else (
      lambda x, axis=0: jnp.repeat(x, seq.group, axis=axis) if seq.prompt_index is None
      else jnp.take(x, jnp.asarray(owner, jnp.int32), axis=axis))
  ids = jnp.concatenate([take(seq.prompt_ids), seq.completion], axis=1)
  attn = jnp.concatenate([take(seq.prompt_mask), seq.completion_mask.astype(jnp.int32)], axis=1)
  positions = jnp.concatenate([take(seq.prompt_positions, 1), seq.completion_positions], axis=2)
  if not seq.grid:
    return ids, attn, positions, None, ()
  per = len(seq.grid) // seq.prompts
  grid = tuple(seq.grid[p * per + k] for p in owner for k in range(per))
  pixels = seq.pixel_values
  if not same:
    sizes = {int(np.prod(g)) for g in seq.grid}
    if len(sizes) == 1:  # Equal images: a reshape and a row gather, which shard cleanly.
      by_prompt = pixels.reshape((seq.prompts, -1, pixels.shape[-1]))
      pixels = take(by_prompt).reshape((-1, pixels.shape[-1]))
    else:
      offsets = _patch_offsets(seq.grid)
      index = np.concatenate([np.arange(offsets[p * per], offsets[(p + 1) * per]) for p in owner])
      pixels = jnp.take(pixels, jnp.asarray(index, jnp.int32), axis=0)
  return ids, attn, positions, pixels, grid
