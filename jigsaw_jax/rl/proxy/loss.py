"""Proxy-RLHF's policy-gradient loss on the proxy's accept/reject decisions, and the per-position
advantages (`prefix_advantages`); see network.py for the MDP."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("mirrored", "reinforce")


@dataclasses.dataclass(frozen=True)
class ProxyLossConfig:
  epsilon_low: float = 0.2  # PPO clip of the decision ratio (matters when num_iterations > 1)
  epsilon_high: float = 0.2
  aggregation: str = "episode_mean"  # episode_mean (GRPO's) | decision_mean (over the batch)
  entropy_coef: float = 0.0  # bonus on the Bernoulli entropy of asked decisions
  # reinforce: -A log pi(decision), PPO-clipped. mirrored: a decision with A >= 0 gets its own
  # log-prob raised, one with A < 0 the opposite decision's (see proxy_loss).
  objective: str = "mirrored"

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"proxy objective must be one of {OBJECTIVES}; got {self.objective!r}.")
    if self.aggregation not in ("episode_mean", "decision_mean"):
      raise ValueError("proxy loss aggregation must be 'episode_mean' or 'decision_mean'; got "
                       f"{self.aggregation!r}.")


def decision_logits(network: nn.Module, proxy_params, embedding: jax.Array, states: jax.Array,
                    candidates: jax.Array) -> jax.Array:
  """The proxy's accept logits [B, T, K] for recorded states [B, T, E] and candidates [B, T, K].

  The policy's tensors enter through stop_gradient: nothing flows back into the frozen policy.
  """
  table = network.apply(proxy_params, jax.lax.stop_gradient(embedding),
                        method=lambda m, e: m.candidate_features(e))  # [V, H]
  state = network.apply(proxy_params, jax.lax.stop_gradient(states),
                        method=lambda m, s: m.state_features(s))  # [B, T, H]
  return network.apply(proxy_params, state[:, :, None, :], jnp.take(table, candidates, axis=0),
                       method=lambda m, s, c: m.readout(s, c))


def proxy_loss(network: nn.Module, proxy_params, embedding: jax.Array, rollout: Any,
               advantages: jax.Array, cfg: ProxyLossConfig = ProxyLossConfig()):
  """Policy gradient on the accept/reject decisions of `rollout` (a proxy_sampler.ProxyRollout)
  with group-relative advantages.

  `advantages` is per episode [B] (every decision of an episode shares its GRPO advantage) or per
  position [B, T] (`prefix_advantages`). The policy's embedding and states enter through
  stop_gradient: only `proxy_params` receive gradients.
  """
  logit = decision_logits(network, proxy_params, embedding, rollout.states, rollout.candidates)
  logp = jnp.where(rollout.accepted, jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit))
  mask = rollout.asked.astype(jnp.float32)
  adv = advantages.astype(jnp.float32)
  adv = adv[:, None, None] if adv.ndim == 1 else adv[:, :, None]
  ratio = jnp.exp(logp - rollout.decision_logp)
  clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
  if cfg.objective == "reinforce":
    per_decision = -jnp.minimum(ratio * adv, clipped * adv)
  else:
    better = jnp.where(adv >= 0, rollout.accepted, ~rollout.accepted)
    better_logp = jnp.where(better, jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit))
    per_decision = -jnp.abs(adv) * better_logp
  p = jax.nn.sigmoid(logit)
  entropy = -(p * jax.nn.log_sigmoid(logit) + (1 - p) * jax.nn.log_sigmoid(-logit))
  per_decision = per_decision - cfg.entropy_coef * entropy
  if cfg.aggregation == "episode_mean":
    count = mask.sum((1, 2))
    loss = jnp.mean((per_decision * mask).sum((1, 2)) / jnp.maximum(count, 1.0))
  else:
    loss = (per_decision * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  n = jnp.maximum(mask.sum(), 1.0)
  metrics = {
      "proxy/decisions_per_episode": mask.sum((1, 2)).mean(),
      "proxy/reject_rate": ((~rollout.accepted) * mask).sum() / n,
      "proxy/p_accept": (jax.lax.stop_gradient(p) * mask).sum() / n,
      "proxy/entropy": (jax.lax.stop_gradient(entropy) * mask).sum() / n,
      "proxy/clip_fraction": ((jnp.abs(ratio - clipped) > 0) * mask).sum() / n,
  }
  return loss, metrics


def prefix_advantages(rewards: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
                      epsilon: float = 1e-4) -> np.ndarray:
  """Per-position group-relative advantages [B, T] (host, numpy), rewards [P, G].

  The decision at position t of an episode is credited against the episodes of its group that
  reached t with the same accepted tokens: A[b, t] = (r_b - mean of r over those episodes,
  itself included) / (std of the group's rewards + epsilon). At t = 0 every episode of the group
  shares the prefix, so this is GRPO's advantage; later, episodes that already differ earlier stop
  adding their (irrelevant) luck to the baseline. Measured on the miniature: with one shared
  baseline, half of a group's rewards were decided by the first answer token and drowned the
  signal of the second one.
  """
  rewards = np.asarray(rewards, np.float64)
  groups, group = rewards.shape
  tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
  steps = tokens.shape[1]
  out = np.zeros((groups * group, steps), np.float32)
  for p in range(groups):
    r = rewards[p]
    scale = r.std(ddof=1) + epsilon
    rows = tokens[p * group:(p + 1) * group]
    for t in range(steps):
      prefixes = [row[:t].tobytes() for row in rows]
      for g in range(group):
        same = [h for h in range(group) if prefixes[h] == prefixes[g]]
        out[p * group + g, t] = (r[g] - r[same].mean()) / scale
  return out * mask
