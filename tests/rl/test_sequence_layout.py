"""One GRPO step's data flow: each prompt collated once with its M-RoPE built once, and held once
in the training batch (its G completions beside it); prompts are repeated only inside the jit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import jigsaw_2x1
from jigsaw_jax import data as data_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.processing import PromptInputs, collate
from jigsaw_jax.rl import prompts as prompts_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.grpo.step import GrpoStep
from jigsaw_jax.rl.optim import make_optimizer
from jigsaw_jax.rl.policy_steps import PolicySteps
from jigsaw_jax.rl.sequences import build_sequences, expand_rows, split_rows
from jigsaw_jax.generate.sampler import repeat_prompts
from jigsaw_jax.tools import scale_check

PAD = 0


def _encoded(cfg, grids, seed=0):
  """One PromptInputs per grid: text of different lengths around one image."""
  rng = np.random.default_rng(seed)
  v, merge = cfg.vision, cfg.vision.spatial_merge_size
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  out = []
  for i, grid in enumerate(grids):
    ids = np.concatenate([rng.integers(1, 1000, 1 + 3 * i), [cfg.vision_start_token_id],
                          [cfg.image_token_id] * (int(np.prod(grid)) // merge ** 2),
                          [cfg.vision_end_token_id], rng.integers(1, 1000, 2)]).astype(np.int32)
    pixels = rng.normal(size=(int(np.prod(grid)), patch_dim)).astype(np.float32)
    out.append(PromptInputs(ids, pixels, np.asarray([grid], np.int32)))
  return out


def _completions(rows, new_tokens=4, seed=1):
  rng = np.random.default_rng(seed)
  completion = rng.integers(1, 1000, (rows, new_tokens)).astype(np.int32)
  lengths = rng.integers(1, new_tokens + 1, rows)
  return completion, (np.arange(new_tokens)[None] < lengths[:, None]).astype(np.float32)


def test_batch_holds_each_prompt_once_and_expands_to_the_repeated_rows():
  cfg = scale_check.check_model_config()
  grids, group = [(1, 4, 4), (1, 4, 8), (1, 4, 4)], 3
  prompts = collate(_encoded(cfg, grids), PAD)
  completion, mask = _completions(len(grids) * group)
  seq = build_sequences(cfg, prompts, completion, mask, group)
  assert seq.prompt_ids.shape[0] == seq.prompt_positions.shape[1] == len(grids)
  assert seq.rows == len(grids) * group and seq.grid == tuple(grids)
  assert seq.pixel_values.shape[0] == sum(int(np.prod(g)) for g in grids)  # once per prompt

  # The rows the row-by-row pass builds (jnp, in its jit) are what repeating each prompt G times
  # on the host gives, with M-RoPE recomputed over the repeated rows.
  ids, attn, positions, pixels, grid = expand_rows(seq)
  rows = repeat_prompts(prompts, group, cfg.image_token_id)
  index = mllm.rope_index(cfg, rows.input_ids, rows.image_grid_thw, rows.attention_mask)
  np.testing.assert_array_equal(ids, np.concatenate([rows.input_ids, completion], 1))
  np.testing.assert_array_equal(attn, np.concatenate([rows.attention_mask, mask], 1))
  np.testing.assert_array_equal(positions[..., :seq.prompt_length], index.positions)
  start = rows.attention_mask.sum(1) + index.deltas
  np.testing.assert_array_equal(positions[0, :, seq.prompt_length:],
                                start[:, None] + np.arange(completion.shape[1]))
  np.testing.assert_array_equal(pixels, rows.pixel_values)
  assert grid == tuple(tuple(g) for g in rows.image_grid_thw.tolist())


def test_micro_batches_cut_through_groups_score_like_the_whole_batch():
  cfg = scale_check.check_model_config()
  group = 3
  prompts = collate(_encoded(cfg, [(1, 4, 4), (1, 4, 8)]), PAD)
  completion, mask = _completions(2 * group)
  seq = build_sequences(cfg, prompts, completion, mask, group)
  parts = list(split_rows(seq, 3))  # 2 rows each: rows 2, 3 continue different prompts
  assert [p.prompts for p in parts] == [1, 2, 1]
  assert [p.prompt_index for p in parts] == [(0, 0), None, (0, 0)]
  assert [p.group for p in parts] == [1, 1, 1]
  assert parts[1].pixel_values.shape[0] == 16 + 32  # the images of the two prompts, once each
  steps = PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10), share_prompt=False)
  params = mllm.init_params(cfg, jax.random.key(0))
  whole = np.asarray(steps.score(params, seq)[0])
  cut = np.concatenate([np.asarray(steps.score(params, p)[0]) for p in parts])
  np.testing.assert_allclose(cut, whole, rtol=1e-5, atol=1e-5)


def test_rows_taken_across_draws_equal_collating_the_picked_prompts():
  cfg = scale_check.check_model_config()
  first = _encoded(cfg, [(1, 4, 4), (1, 4, 8), (1, 8, 4)], seed=0)
  second = _encoded(cfg, [(1, 4, 4), (1, 8, 8)], seed=3)
  draws = [prompts_lib.prepare(cfg, collate(e, PAD, 8)) for e in (first, second)]
  picked = [3, 0, 2]
  got = prompts_lib.take_rows(draws, picked, cfg.image_token_id, PAD, 8)
  want = prompts_lib.prepare(cfg, collate([(first + second)[i] for i in picked], PAD, 8))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def _config():
  c = jigsaw_2x1.get_config("tiny")
  c.total_steps = 1
  c.pretrain.steps = 0
  c.data.pipeline.prompts_per_batch = 2
  c.data.pipeline.group_size = 3
  c.rollout.max_new_tokens = 4
  c.rl.dynamic_sampling = False
  return c


@pytest.mark.slow
def test_a_grpo_step_builds_mrope_once_and_never_repeats_prompts_on_the_host():
  config = _config()
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  params = policy_lib.initial_params(config.model, model_cfg, jax.random.key(0))
  step = GrpoStep.from_config(config, model_cfg, processor, params)
  seen = {"rope": [], "seq": []}
  generate, grads = step.sampler.generate, step.steps.grads

  def recording_generate(params, batch, rng, rope_index=None):
    seen["rope"].append(rope_index)
    return generate(params, batch, rng, rope_index)

  def recording_grads(params, seq, *args, **kwargs):
    seen["seq"].append(seq)
    return grads(params, seq, *args, **kwargs)

  step.sampler.generate, step.steps.grads = recording_generate, recording_grads
  batches = iter(data_lib.make_dataset(
      config.data, record_transform=rollout_rewards.encode_record(processor)))
  step(step.init_state(params, jax.random.key(1)), batches, jax.random.key(2))

  (rope,), (seq,) = seen["rope"], seen["seq"]
  assert rope is not None  # the sampler was handed the step's index, not left to compute one
  # ... and the update's prompt positions are that same index: computed once.
  assert np.shares_memory(seq.prompt_positions, rope.positions)
  assert seq.prompts == 2 and seq.rows == 2 * 3 and seq.group == 3
  patches = sum(int(np.prod(g)) for g in seq.grid)
  assert len(seq.grid) == 2 and seq.pixel_values.shape[0] == patches  # pixels once per prompt
