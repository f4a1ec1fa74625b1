"""GRPO advantages and losses: hand-computed values, and TRL's formulas on the same tensors."""

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


def _trl_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len,
              sequence=False):
  """TRL GRPOTrainer's loss (v0.19+ `_compute_loss`), restated in torch for these tensors.

  `logp` may be a torch tensor that requires grad; the others are numpy arrays.
  """
  old, ref, adv, mask = (torch.tensor(x) for x in (old, ref, adv, mask))
  logp = logp if isinstance(logp, torch.Tensor) else torch.tensor(logp)
  per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
  log_ratio = logp - old
  if sequence:
    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
  coef_1 = torch.exp(log_ratio)
  coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
  per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  if loss_type == "grpo":
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
  if loss_type == "dr_grpo":
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
  if loss_type == "dapo":
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
  raise ValueError(loss_type)


@pytest.mark.parametrize("name,trl_type,sequence", [
    ("grpo", "grpo", False), ("dr_grpo", "dr_grpo", False), ("dapo", "dapo", False),
    ("gspo", "grpo", True)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_losses_and_gradients_match_trl_formulas(name, trl_type, sequence, beta):
  logp, old, ref, adv, mask = _inputs()
  eps_high = 0.28 if name == "dapo" else 0.2
  cfg = losses.LossConfig(name=name, epsilon_low=0.2, epsilon_high=eps_high, beta=beta,
                          max_completion_length=7)

  def ours(lp):
    return losses.get(name)(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                            jnp.asarray(mask), cfg)[0]

  t_logp = torch.tensor(logp, requires_grad=True)
  theirs = _trl_loss(t_logp, old, ref, adv, mask, trl_type, 0.2, eps_high, beta, 7, sequence)
  theirs.backward()
  np.testing.assert_allclose(float(ours(jnp.asarray(logp))), theirs.item(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(jnp.asarray(logp))), t_logp.grad.numpy(),
                             rtol=1e-4, atol=1e-6)


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
  with pytest.raises(ValueError, match="registered: \\['dapo', 'dr_grpo', 'grpo', 'gspo'\\]"):
    losses.get("ppo")
  with pytest.raises(ValueError, match="registered: \\['dr_grpo', 'grpo', 'rloo'\\]"):
    advantages.get("gae")
