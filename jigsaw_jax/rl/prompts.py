"""The prompts of one GRPO step: collated once, their M-RoPE index built once (host, numpy).

    prompts = prepare(model_cfg, collate(encoded, pad_id, bucket))
    rollout = sampler.generate(params, prompts.batch, rng, prompts.rope)
    seq = build_sequences(model_cfg, prompts.batch, tokens, mask, G, prompts.rope)

Groups that dynamic sampling picks across draws are rows taken from the draws' collated prompts
(`take_rows`), re-padded to the bucket their longest prompt needs: the same arrays as collating
those prompts anew, without encoding or indexing anything again.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Union

import numpy as np

from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch, bucket_length


class Prompts(NamedTuple):
  """Left-padded prompts and their M-RoPE index (positions [3, P, L], decode deltas [P])."""

  batch: PromptBatch
  rope: mllm.RopeIndex


def prepare(cfg: ModelConfig, batch: PromptBatch) -> Prompts:
  """`batch` with its M-RoPE index, the one `rope_index` call of a draw."""
  return Prompts(batch, mllm.rope_index(cfg, batch.input_ids, batch.image_grid_thw,
                                        batch.attention_mask))


def row_images(batch: PromptBatch, image_token_id: int) -> List[List[int]]:
  """Which images (rows of `image_grid_thw`) each prompt row holds: one per run of image-pad
  tokens, consumed in reading order as `rope_index` consumes them."""
  out, next_image = [], 0
  for ids in np.asarray(batch.input_ids):
    is_pad = (ids == image_token_id).astype(np.int8)
    runs = int(np.sum(np.diff(np.concatenate([[0], is_pad])) == 1))
    out.append(list(range(next_image, next_image + runs)))
    next_image += runs
  return out


def take_rows(parts: Sequence[Prompts], rows: Sequence[int], image_token_id: int, pad_id: int,
              buckets: Union[int, Sequence[int]]) -> Prompts:
  """Rows `rows` (indices into the parts' prompts, in order) as one Prompts, left-padded to the
  bucket of the longest of them: what collating their encoded prompts would give."""
  where = [(d, r) for d, part in enumerate(parts) for r in range(part.batch.input_ids.shape[0])]
  picks = [where[int(i)] for i in rows]
  if not picks:
    raise ValueError("take_rows needs at least one row.")
  real = [int(parts[d].batch.attention_mask[r].sum()) for d, r in picks]
  length = bucket_length(max(real), buckets)
  ids = np.full((len(picks), length), pad_id, np.int32)
  mask = np.zeros((len(picks), length), np.int32)
  positions = np.zeros((3, len(picks), length), np.int32)
  deltas = np.zeros((len(picks),), np.int32)
  images = [row_images(part.batch, image_token_id) for part in parts]
  offsets = [np.concatenate([[0], np.cumsum(np.prod(
      np.asarray(part.batch.image_grid_thw).reshape(-1, 3), axis=-1))]).astype(np.int64)
      for part in parts]
  pixels, grids = [], []
  for k, ((d, r), n) in enumerate(zip(picks, real)):
    batch, rope = parts[d].batch, parts[d].rope
    # Left padding: the n real tokens are the row's last n columns.
    ids[k, length - n:] = np.asarray(batch.input_ids)[r, -n:] if n else []
    mask[k, length - n:] = 1
    positions[:, k, length - n:] = np.asarray(rope.positions)[:, r, -n:] if n else 0
    deltas[k] = rope.deltas[r]
    for i in images[d][r]:
      pixels.append(np.asarray(batch.pixel_values)[offsets[d][i]:offsets[d][i + 1]])
      grids.append(np.asarray(batch.image_grid_thw).reshape(-1, 3)[i])
  dim = np.shape(parts[0].batch.pixel_values)[1:]
  batch = PromptBatch(
      input_ids=ids, attention_mask=mask,
      pixel_values=(np.concatenate(pixels).astype(np.float32) if pixels
                    else np.zeros((0,) + dim, np.float32)),
      image_grid_thw=np.asarray(grids, np.int32).reshape(-1, 3))
  return Prompts(batch, mllm.RopeIndex(positions, deltas))
