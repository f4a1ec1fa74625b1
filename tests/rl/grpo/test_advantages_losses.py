"""GRPO advantages and losses: hand-computed values (the losses against TRL's own trainer are in
test_losses_trl.py)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

from jigsaw_jax.rl.grpo import advantages, losses


def test_grpo_advantage_by_hand():
  rewards = np.array([[1.5, 0.5, 0.5, 0.5]])
  mean, std = 0.75, np.sqrt(((0.75**2) + 3 * 0.25**2) / 3)  # unbiased
  expected = (rewards - mean) / (std + 1e-4)
  np.testing.assert_allclose(advantages.get("grpo")(rewards), expected, rtol=1e-6)


def test_grpo_advantage_matches_torch_default_std():
  rewards = np.random.default_rng(0).uniform(0, 1.5, (5, 8)).astype(np.float32)
  t = torch.tensor(rewards)
  expected = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)
  np.testing.assert_allclose(advantages.grpo(rewards), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_equal_rewards_give_zero_advantage_and_are_flagged():
  rewards = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  np.testing.assert_array_equal(advantages.grpo(rewards)[0], 0.0)
  assert advantages.zero_variance_groups(rewards).tolist() == [True, False]


def test_dr_grpo_and_rloo_by_hand():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(advantages.dr_grpo(rewards), [[0.5, -0.5, -0.5, 0.5]])
  np.testing.assert_allclose(advantages.rloo(rewards), [[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]],
                             rtol=1e-6)


def test_group_of_one_is_refused():
  with pytest.raises(ValueError, match=r"\[num_prompts, G\] with G >= 2"):
    advantages.grpo(np.ones((4, 1)))


def test_overlong_penalty_in_tokens():
  np.testing.assert_allclose(advantages.overlong_penalty([10, 16, 18, 20, 25], 20, 4),
                             [0.0, 0.0, -0.5, -1.0, -1.0])


def _inputs(seed=0, batch=6, length=7):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-2, 0.5, (batch, length)).astype(np.float32)
  old = logp + rng.normal(0, 0.3, logp.shape).astype(np.float32)
  ref = logp + rng.normal(0, 0.3, logp.shape).astype(np.float32)
  adv = rng.normal(0, 1, batch).astype(np.float32)
  mask = (np.arange(length)[None] < rng.integers(1, length + 1, batch)[:, None]).astype(np.float32)
  return logp, old, ref, adv, mask


def test_grpo_loss_by_hand_with_ratio_one():
  # mu = 1: old = logp, ratio 1; beta = 0 -> loss = -mean_seq(A) and grad = -A/len per token.
  logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv = jnp.array([1.0, -2.0])
  cfg = losses.LossConfig(beta=0.0)
  loss, metrics = losses.grpo_loss(logp, jax.lax.stop_gradient(logp), None, adv, mask, cfg)
  assert float(loss) == pytest.approx(-(1.0 - 2.0) / 2)
  assert float(metrics["clip_fraction"]) == 0.0
  grad = jax.grad(lambda lp: losses.grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask,
                                              cfg)[0])(logp)
  np.testing.assert_allclose(grad, [[-1 / 6, -1 / 6, -1 / 6], [1 / 2, 1 / 2, 0.0]], rtol=1e-6)


def test_kl_estimators_by_hand():
  log_ratio = jnp.array([0.5])  # ref - logp
  assert float(losses.KL_ESTIMATORS["k1"](log_ratio)[0]) == pytest.approx(-0.5)
  assert float(losses.KL_ESTIMATORS["k2"](log_ratio)[0]) == pytest.approx(0.125)
  assert float(losses.KL_ESTIMATORS["k3"](log_ratio)[0]) == pytest.approx(np.exp(0.5) - 1.5)


def test_beta_zero_needs_no_reference():
  logp, old, _, adv, mask = _inputs()
  loss, metrics = losses.dapo_loss(logp, old, None, adv, mask, losses.LossConfig(beta=0.0))
  assert np.isfinite(float(loss)) and float(metrics["kl"]) == 0.0
  with pytest.raises(ValueError, match="needs the reference"):
    losses.dapo_loss(logp, old, None, adv, mask, losses.LossConfig(beta=0.04))


def test_token_log_probs_and_entropy():
  logits = jnp.log(jnp.array([[[0.25, 0.25, 0.5]]]))
  assert float(losses.token_log_probs(logits, jnp.array([[2]]))[0, 0]) == pytest.approx(
      np.log(0.5))
  assert float(losses.entropy(logits)[0, 0]) == pytest.approx(-(0.5 * np.log(0.25) + 0.5 * np.log(0.5)))


def test_unknown_names_list_the_registered_ones():
  with pytest.raises(ValueError,
                     match="registered: \\['bnpo', 'dapo', 'dr_grpo', 'grpo', 'gspo'\\]"):
    losses.get("ppo")
  with pytest.raises(ValueError, match="registered: \\['dr_grpo', 'grpo', 'rloo'\\]"):
    advantages.get("gae")
