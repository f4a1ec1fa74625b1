"""DAPO's dynamic sampling: the update trains on groups whose rewards differ, drawn over as many
batches as it takes (up to config.rl.max_draws), and zero-variance groups only fill a short batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import jigsaw_2x1
from jigsaw_jax import data as data_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo import dynamic_sampling
from jigsaw_jax.rl.grpo.step import GrpoStep


def _groups(rewards, tag, accuracy=None):
  """Groups with the given [P, G] rewards (and accuracy: the rewards unless given); every row's
  token holds its (tag, prompt, sample)."""
  rewards = np.asarray(rewards, np.float32)
  accuracy = rewards if accuracy is None else np.asarray(accuracy, np.float32)
  prompts, group = rewards.shape
  rows = [(tag, p, g) for p in range(prompts) for g in range(group)]
  return dynamic_sampling.Groups(
      puzzles=[f"{tag}-puzzle{p}" for p in range(prompts)],
      tokens=np.array([[100 * t + 10 * p + g] for t, p, g in rows]),
      mask=np.ones((prompts * group, 1)), texts=[f"{t}{p}{g}" for t, p, g in rows],
      scores={"total": rewards, "accuracy": accuracy, "correct": accuracy}, rewards=rewards)


def test_fill_batch_keeps_signal_groups_in_draw_order_then_fills():
  first = _groups([[1, 1, 1], [0, 1, 0], [0, 0, 0]], tag=1)
  second = _groups([[1, 0, 1], [2, 2, 2], [0.5, 0, 0]], tag=2)
  assert dynamic_sampling.count_informative([first, second]) == 3
  batch = dynamic_sampling.fill_batch([first, second], 3)
  assert batch.puzzles == ["1-puzzle1", "2-puzzle0", "2-puzzle2"]
  np.testing.assert_array_equal(batch.rewards, [[0, 1, 0], [1, 0, 1], [0.5, 0, 0]])
  # Rows travel with their group: tokens, masks and texts of the same samples.
  np.testing.assert_array_equal(batch.tokens[:, 0], [110, 111, 112, 200, 201, 202, 220, 221, 222])
  assert batch.texts[3:6] == ["200", "201", "202"]
  # Too few signal groups: zero-variance ones fill the rest, in draw order.
  short = dynamic_sampling.fill_batch([first], 3)
  assert short.puzzles == ["1-puzzle1", "1-puzzle0", "1-puzzle2"]
  with pytest.raises(ValueError, match="fewer than the batch"):
    dynamic_sampling.fill_batch([first], 4)


def test_groups_are_filtered_on_accuracy_by_default_as_dapo_does():
  # Group 0 is all wrong, but one sample has the format and one not: its total reward varies
  # (0.5 vs 0) while its accuracy does not. DAPO/verl (filter_groups.metric=acc) drop it.
  accuracy = [[0, 0, 0], [1, 0, 1]]
  total = [[0.5, 0, 0.5], [1.5, 0.5, 1.5]]
  draw = _groups(total, tag=1, accuracy=accuracy)
  assert dynamic_sampling.informative(draw).tolist() == [False, True]
  assert dynamic_sampling.count_informative([draw]) == 1
  assert dynamic_sampling.fill_batch([draw], 1).puzzles == ["1-puzzle1"]
  # metric="reward" filters on the reward the advantages come from: both groups count.
  assert dynamic_sampling.informative(draw, "reward").tolist() == [True, True]
  assert dynamic_sampling.count_informative([draw], "reward") == 2
  with pytest.raises(ValueError, match=r"dynamic_sampling_metric='format'; expected one of "
                     r"\['accuracy', 'reward'\]"):
    dynamic_sampling.count_informative([draw], "format")


def test_at_the_cap_the_batch_is_filled_or_the_step_raises_as_verl():
  draws = [_groups([[1, 1], [0, 1]], tag=1), _groups([[0, 0], [1, 1]], tag=2)]
  filled = dynamic_sampling.fill_batch(draws, 2, at_cap="fill")
  assert filled.puzzles == ["1-puzzle1", "1-puzzle0"]
  with pytest.raises(ValueError, match=r"found 1 groups whose accuracy varies in 2 draws, fewer "
                     r"than the batch of 2.*max_draws"):
    dynamic_sampling.fill_batch(draws, 2, at_cap="raise")
  # Enough informative groups: "raise" takes them like "fill" does.
  assert dynamic_sampling.fill_batch(draws, 1, at_cap="raise").puzzles == ["1-puzzle1"]
  with pytest.raises(ValueError, match=r"dynamic_sampling_at_cap='pad'"):
    dynamic_sampling.fill_batch(draws, 1, at_cap="pad")


def _config():
  c = jigsaw_2x1.get_config("tiny")
  c.total_steps = 2
  c.pretrain.steps = 0
  c.eval.at_start = c.eval.at_end = False
  c.eval.every_steps = 0
  c.checkpoint.async_save = False
  c.data.pipeline.prompts_per_batch = 2
  c.data.pipeline.group_size = 4
  c.rollout.max_new_tokens = 4
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 3
  return c


def _scripted(script):
  """Rewards that follow `script` (one [P, G] array per draw), with the real scores' other keys."""
  def rewards(puzzles, texts, group):
    scores = rollout_rewards.score_texts(puzzles, texts, group)
    scores["total"] = scores["accuracy"] = np.asarray(next(script), np.float32)
    return scores
  return rewards


@pytest.mark.slow
def test_step_draws_until_the_batch_has_a_signal_and_stops_at_the_cap():
  # Scripted rewards per draw (2 prompts x 4 samples). Step 1: the first draw has one group with
  # a signal, the second two more, so it stops after 2 draws with no zero-variance group kept.
  # Step 2: nothing ever varies, so it stops at max_draws = 3 and keeps zero-variance groups.
  script = iter([
      [[1, 1, 1, 1], [0, 1, 0, 0]],
      [[1, 0, 0, 0], [0, 0, 1, 1]],
      [[1, 1, 1, 1], [0, 0, 0, 0]],
      [[0, 0, 0, 0], [0, 0, 0, 0]],
      [[1, 1, 1, 1], [1, 1, 1, 1]],
  ])
  config = _config()
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  params = policy_lib.initial_params(config.model, model_cfg, jax.random.key(0))
  step = GrpoStep.from_config(config, model_cfg, processor, params, rewards=_scripted(script))
  state = step.init_state(params, jax.random.key(1))
  batches = iter(data_lib.make_dataset(
      config.data, record_transform=rollout_rewards.encode_record(processor)))

  state, metrics, records = step(state, batches, jax.random.key(2))
  assert int(state["step"]) == 1
  assert metrics["dynamic/draws"] == 2 and metrics["dynamic/zero_variance_kept"] == 0
  assert records.draws == 2 and len(records.drawn) == 4
  # The update's groups: the first draw's second group, then the second draw's first.
  np.testing.assert_array_equal(records.groups.rewards, [[0, 1, 0, 0], [1, 0, 0, 0]])
  assert records.groups.puzzles == [records.drawn.puzzles[1], records.drawn.puzzles[2]]
  # Reward metrics describe every sample drawn, not just the groups kept.
  assert metrics["reward/total"] == pytest.approx(np.mean([1, 1, 1, 1, 0, 1, 0, 0,
                                                           1, 0, 0, 0, 0, 0, 1, 1]))

  state, metrics, records = step(state, batches, jax.random.key(3))
  assert int(state["step"]) == 2
  assert metrics["dynamic/draws"] == 3 and metrics["dynamic/zero_variance_kept"] == 1
  assert metrics["reward/zero_variance_groups"] == 1
  with pytest.raises(StopIteration):
    next(script)  # exactly the five scripted draws were made
