"""Turning prompts + sampled completions into the training batch of one GRPO step (host, numpy).

The policy is scored on prompt + completion: token ids [R, L + T] (prompts left-padded to L,
completions right-padded to T), the attention mask, M-RoPE position ids recomputed over the whole
sequence exactly as the reference does, and every row's images (a prompt's images repeated for
its G samples). `group` records that rows come in groups of G sharing one prompt, so scoring may
run each prompt once (rl/scoring.py `shared_prompt_scores`); 1 promises nothing.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.generate.sampler import repeat_prompts


class SequenceBatch(NamedTuple):
  input_ids: np.ndarray  # int32 [R, L + T]
  attn_mask: np.ndarray  # int32 [R, L + T]
  positions: np.ndarray  # int32 [3, R, L + T]
  pixel_values: np.ndarray  # float32 [patches of all rows' images, D]
  completion: np.ndarray  # int32 [R, T]: the sampled tokens
  completion_mask: np.ndarray  # float32 [R, T]: 1 up to and including the first EOS
  grid: Tuple[Tuple[int, int, int], ...]  # static image grids of all rows, in row order
  group: int = 1  # rows g*G ... g*G + G-1 hold the same prompt and images (static)

  @property
  def prompt_length(self) -> int:
    return self.input_ids.shape[1] - self.completion.shape[1]


def build_sequences(cfg: ModelConfig, prompts: PromptBatch, completion: np.ndarray,
                    completion_mask: np.ndarray, group_size: int) -> SequenceBatch:
  """Joins each prompt (repeated G times) with its G completions."""
  completion = np.asarray(completion, np.int32)
  completion_mask = np.asarray(completion_mask, np.float32)
  rows = repeat_prompts(prompts, group_size, cfg.image_token_id) if group_size > 1 else prompts
  if rows.input_ids.shape[0] != completion.shape[0]:
    raise ValueError(f"{rows.input_ids.shape[0]} prompt rows (after repeating G={group_size}) but "
                     f"{completion.shape[0]} completions.")
  ids = np.concatenate([rows.input_ids, completion], axis=1)
  attn = np.concatenate([rows.attention_mask, completion_mask.astype(np.int32)], axis=1)
  # Prompt positions as the processor's ids imply; completion tokens are text, whatever their id,
  # and continue each row at (real prompt tokens + j + delta), exactly as decoding placed them.
  index = mllm.rope_index(cfg, rows.input_ids, rows.image_grid_thw, rows.attention_mask)
  start = rows.attention_mask.sum(1) + index.deltas
  tail = start[:, None] + np.arange(completion.shape[1])[None]
  positions = np.concatenate([index.positions, np.broadcast_to(tail, (3,) + tail.shape)], axis=2)
  grid = tuple(tuple(int(v) for v in g) for g in np.asarray(rows.image_grid_thw).reshape(-1, 3))
  return SequenceBatch(ids.astype(np.int32), attn.astype(np.int32), positions.astype(np.int32),
                       np.asarray(rows.pixel_values, np.float32), completion, completion_mask,
                       grid, max(int(group_size), 1))


def split_rows(batch: SequenceBatch, num_splits: int):
  """Yields `num_splits` consecutive row blocks (micro-batches) with their own images. Blocks of
  whole groups keep `group`; a split through a group leaves blocks that share nothing (group 1)."""
  rows = batch.input_ids.shape[0]
  if rows % num_splits:
    raise ValueError(f"{rows} rows do not split into {num_splits} equal micro-batches; make "
                     "prompts_per_batch * group_size a multiple of the number of micro-batches.")
  size = rows // num_splits
  group = batch.group if size % batch.group == 0 else 1
  images_per_row = len(batch.grid) // rows if rows else 0
  if images_per_row * rows != len(batch.grid):
    raise ValueError("micro-batching needs the same number of images in every row.")
  patches = [int(np.prod(g)) for g in batch.grid]
  offsets = np.concatenate([[0], np.cumsum(patches)])
  for i in range(num_splits):
    lo, hi = i * size, (i + 1) * size
    g_lo, g_hi = lo * images_per_row, hi * images_per_row
    yield SequenceBatch(
        batch.input_ids[lo:hi], batch.attn_mask[lo:hi], batch.positions[:, lo:hi],
        batch.pixel_values[offsets[g_lo]:offsets[g_hi]], batch.completion[lo:hi],
        batch.completion_mask[lo:hi], batch.grid[g_lo:g_hi], group)
