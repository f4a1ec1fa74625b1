"""Policy-gradient losses on per-token log-probabilities, registered by name.

All losses share one per-token objective, the clipped surrogate of PPO/GRPO plus an optional KL
penalty to the reference policy:

    ratio_t = exp(logp_t - old_logp_t)                  (sequence-level for GSPO)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t

and differ in how tokens are aggregated (and so how long and short completions are weighted), as
TRL's GRPOTrainer `loss_type`s define them:

* grpo    : mean over each sequence's tokens, then mean over sequences (Shao et al.; Jigsaw-R1).
* dr_grpo : sum over all tokens / (num_sequences * max_completion_length) (Liu et al. 2025).
* bnpo    : sum over the batch's tokens / the number of tokens of this (micro-)batch.
* dapo    : sum over all tokens / the number of tokens of the whole generation batch, over every
            micro-batch and process of the step (Yu et al.; usually with eps_high > eps_low), so
            that the step's gradient does not depend on how the batch is split.
* gspo    : the ratio is exp(mean_t(logp - old_logp)) per sequence (Zheng et al. 2025), then
            aggregated like grpo (TRL: loss_type="grpo", importance_sampling_level="sequence").

Every loss takes `token_normalizer`, the number dapo divides its token sum by. The trainer
averages the gradients of its micro-batches, so it passes the step's completion-token count
divided by the number of micro-batches (`steps.micro_batch_token_normalizer`): the mean of the
micro-batch losses is then the step's token sum over its token count, whatever the split (TRL
divides `num_items_in_batch` by processes and accumulation steps the same way). None: this
batch's own count, which makes dapo equal bnpo. The other losses ignore it.

With mu = 1 inner iteration, old_logp is the current logp without gradient: the ratio is exactly 1
and the gradient is -A * grad(logp), as in the paper's runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

from jigsaw_jax.rl.registry import Registry

KL_ESTIMATORS: Dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    # Functions of log_ratio = ref_logp - logp, for samples drawn from the policy (Schulman 2020).
    "k1": lambda log_ratio: -log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    "k3": lambda log_ratio: jnp.exp(log_ratio) - log_ratio - 1.0,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  name: str = "grpo"
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.04
  kl_estimator: str = "k3"
  max_completion_length: int = 512  # dr_grpo's constant normaliser


LossFn = Callable[..., tuple]
LOSSES: Registry[LossFn] = Registry("loss")
register, get = LOSSES.register, LOSSES.get


def _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
                     sequence_ratio: bool):
  """Per-token loss [B, T] and diagnostics."""
  mask = mask.astype(jnp.float32)
  log_ratio = logp - old_logp
  if sequence_ratio:
    log_ratio = (log_ratio * mask).sum(-1, keepdims=True) / jnp.maximum(
        mask.sum(-1, keepdims=True), 1.0)
    log_ratio = jnp.broadcast_to(log_ratio, logp.shape)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
  adv = advantages[:, None]
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  kl = jnp.zeros_like(logp)
  if cfg.beta != 0.0:
    if ref_logp is None:
      raise ValueError("beta != 0 needs the reference log-probs `ref_logp`.")
    if cfg.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(
          f"Unknown kl_estimator {cfg.kl_estimator!r}; expected one of {sorted(KL_ESTIMATORS)}.")
    kl = KL_ESTIMATORS[cfg.kl_estimator](ref_logp - logp)
    per_token = per_token + cfg.beta * kl
  # A token is "clipped" when the clipped branch is the active one and carries no gradient.
  is_clipped = ((ratio < 1.0 - cfg.epsilon_low) & (adv < 0)) | (
      (ratio > 1.0 + cfg.epsilon_high) & (adv > 0))
  tokens = jnp.maximum(mask.sum(), 1.0)
  metrics = {
      "kl": (kl * mask).sum() / tokens,
      "clip_fraction": (is_clipped * mask).sum() / tokens,
      "ratio_mean": (ratio * mask).sum() / tokens,
  }
  return per_token, mask, metrics


def _sequence_token_mean(per_token, mask):
  return ((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()


@register("grpo")
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
              token_normalizer=None):
  del token_normalizer
  per_token, mask, metrics = _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg,
                                              sequence_ratio=False)
  return _sequence_token_mean(per_token, mask), metrics


@register("gspo")
def gspo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
              token_normalizer=None):
  del token_normalizer
  per_token, mask, metrics = _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg,
                                              sequence_ratio=True)
  return _sequence_token_mean(per_token, mask), metrics


@register("dr_grpo")
def dr_grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
                 token_normalizer=None):
  del token_normalizer
  per_token, mask, metrics = _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg,
                                              sequence_ratio=False)
  return (per_token * mask).sum() / (per_token.shape[0] * cfg.max_completion_length), metrics


def _token_sum_over(per_token, mask, normalizer):
  return (per_token * mask).sum() / normalizer


@register("bnpo")
def bnpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
              token_normalizer=None):
  del token_normalizer  # bnpo always normalises by its own batch.
  per_token, mask, metrics = _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg,
                                              sequence_ratio=False)
  return _token_sum_over(per_token, mask, jnp.maximum(mask.sum(), 1.0)), metrics


@register("dapo")
def dapo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: LossConfig,
              token_normalizer=None):
  per_token, mask, metrics = _per_token_terms(logp, old_logp, ref_logp, advantages, mask, cfg,
                                              sequence_ratio=False)
  normalizer = (jnp.maximum(mask.sum(), 1.0) if token_normalizer is None
                else jnp.asarray(token_normalizer, jnp.float32))
  return _token_sum_over(per_token, mask, normalizer), metrics


def token_log_probs(logits: jnp.ndarray, tokens: jnp.ndarray,
                    temperature: Optional[float] = None) -> jnp.ndarray:
  """log p(token) under logits [B, T, V] for tokens [B, T], computed in float32."""
  logits = logits.astype(jnp.float32)
  if temperature is not None and temperature != 1.0:
    logits = logits / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return picked - logz


def entropy(logits: jnp.ndarray) -> jnp.ndarray:
  """Per-position entropy [B, T] of softmax(logits) in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)
