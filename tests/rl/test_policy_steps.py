"""The policy update's gradient: dapo's token-level normaliser spans the whole step, so splitting
the step into micro-batches leaves its gradient unchanged (bnpo's, by design, does not)."""

from __future__ import annotations

import numpy as np

from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.sequences import split_rows
from jigsaw_jax.rl.optim import make_optimizer, mean_trees, micro_batch_token_normalizer
from jigsaw_jax.rl.policy_steps import PolicySteps
from tests.rl.test_shared_prompt import NEW_TOKENS, _batch, _flat, _model, _rel

GROUP = 2
GRIDS = [(1, 4, 4)] * 4  # 4 prompts x G=2: 8 rows, micro-batches of one group each


def _step_grads(steps, params, seq, advantages, old_logp, ref_logp, micro_batches,
                normalise=True):
  """The trainer's accumulation: mean of the micro-batch gradients."""
  micro = list(split_rows(seq, micro_batches))
  rows = seq.rows // micro_batches
  cut = lambda x: [x[i * rows:(i + 1) * rows] for i in range(micro_batches)]
  normalizer = (micro_batch_token_normalizer([m.completion_mask for m in micro])
                if normalise else None)
  grads = [steps.grads(params, m, a, o, r, token_normalizer=normalizer)[0]
           for m, a, o, r in zip(micro, cut(advantages), cut(old_logp), cut(ref_logp))]
  return _flat(mean_trees(grads))


def test_dapo_gradient_does_not_depend_on_micro_batches():
  cfg, params = _model()
  seq, advantages = _batch(cfg, GRIDS, group=GROUP, seed=1)
  tokens = [float(m.completion_mask.sum()) for m in split_rows(seq, 4)]
  assert len(set(tokens)) > 1, tokens  # micro-batches of different token counts
  make = lambda name: PolicySteps(cfg, losses.LossConfig(
      name=name, epsilon_high=0.28, beta=0.04, max_completion_length=NEW_TOKENS),
                                  make_optimizer(1e-3, 10))
  dapo, bnpo = make("dapo"), make("bnpo")
  logp = np.asarray(dapo.score(params, seq)[0])
  noise = np.random.default_rng(0).normal(0, 0.2, (2,) + logp.shape).astype(np.float32)
  old_logp, ref_logp = logp + noise[0], logp + noise[1]  # ratios off 1, some clipped

  whole = _step_grads(dapo, params, seq, advantages, old_logp, ref_logp, 1)
  split = _step_grads(dapo, params, seq, advantages, old_logp, ref_logp, 4)
  assert _rel(split, whole) < 1e-5
  # One micro-batch: the step's count is the batch's own, as without a normaliser.
  own = _step_grads(dapo, params, seq, advantages, old_logp, ref_logp, 1, normalise=False)
  assert _rel(own, whole) < 1e-6
  # bnpo normalises each micro-batch by its own count: its gradient moves with the split, and
  # dapo without the step's normaliser is bnpo (what dapo computed before).
  bnpo_whole = _step_grads(bnpo, params, seq, advantages, old_logp, ref_logp, 1)
  bnpo_split = _step_grads(bnpo, params, seq, advantages, old_logp, ref_logp, 4)
  assert _rel(bnpo_whole, whole) < 1e-6
  assert _rel(bnpo_split, whole) > 1e-2
  unnormalised = _step_grads(dapo, params, seq, advantages, old_logp, ref_logp, 4,
                             normalise=False)
  assert _rel(unnormalised, bnpo_split) < 1e-6


def test_micro_batch_token_normalizer_is_the_step_count_per_micro_batch():
  masks = [np.array([[1, 1, 0], [1, 0, 0]]), np.array([[1, 1, 1], [1, 1, 1]])]
  assert micro_batch_token_normalizer(masks) == (3 + 6) / 2
  assert micro_batch_token_normalizer([np.zeros((2, 3))]) == 1.0  # never divides by zero
