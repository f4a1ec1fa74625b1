"""Advantage estimators, registered by name so that a variant is a config change.

Every estimator maps rewards shaped [num_prompts, G] (the G samples of a prompt in one row) to
advantages of the same shape. They are pure jnp functions and run on host numpy arrays as well.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from jigsaw_jax.rl.registry import Registry

AdvantageFn = Callable[..., jnp.ndarray]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register, get = ADVANTAGES.register, ADVANTAGES.get


def _check(rewards):
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 2 or rewards.shape[1] < 2:
    raise ValueError(
        f"Advantages need rewards shaped [num_prompts, G] with G >= 2 samples per prompt; "
        f"got shape {rewards.shape}.")
  return rewards


@register("grpo")
def grpo(rewards, epsilon: float = 1e-4) -> jnp.ndarray:
  """GRPO (Shao et al. 2024), as Jigsaw-R1 computes it: (r - mean) / (std + 1e-4), where std is
  the unbiased (n-1) standard deviation over the group (torch's default)."""
  rewards = _check(rewards)
  mean = rewards.mean(axis=1, keepdims=True)
  std = rewards.std(axis=1, ddof=1, keepdims=True)
  return (rewards - mean) / (std + epsilon)


@register("dr_grpo")
def dr_grpo(rewards) -> jnp.ndarray:
  """Dr. GRPO (Liu et al. 2025): r - mean, without the std division that biases toward groups of
  near-identical rewards."""
  rewards = _check(rewards)
  return rewards - rewards.mean(axis=1, keepdims=True)


@register("rloo")
def rloo(rewards) -> jnp.ndarray:
  """REINFORCE leave-one-out (Ahmadian et al. 2024): r_i minus the mean of the other G-1 rewards."""
  rewards = _check(rewards)
  group = rewards.shape[1]
  others_mean = (rewards.sum(axis=1, keepdims=True) - rewards) / (group - 1)
  return rewards - others_mean


def zero_variance_groups(rewards) -> jnp.ndarray:
  """bool [num_prompts]: groups whose rewards are all equal (no learning signal); DAPO's dynamic
  sampling drops them and refills the batch."""
  rewards = jnp.asarray(rewards)
  return jnp.all(rewards == rewards[:, :1], axis=1)


def overlong_penalty(lengths, max_length: int, buffer: int) -> jnp.ndarray:
  """DAPO's soft overlong punishment, in tokens: 0 up to max_length - buffer, then a linear ramp
  down to -1 at max_length, and -1 beyond."""
  lengths = jnp.asarray(lengths, jnp.float32)
  start = max_length - buffer
  ramp = (start - lengths) / max(buffer, 1)
  return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_length, ramp, -1.0))
