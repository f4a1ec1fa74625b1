"""The jitted pieces of a policy update, as pure functions of pytrees.

    scorer = Scorer(model_cfg, temperature)
    logp, entropy = scorer(params, seq)                   # per completion token, no gradient
    grads, loss, metrics = loss_and_grads(params, seq, advantages, old_logp, ref_logp)
    params, opt_state, stats = apply_update(params, opt_state, grads)

A step accumulates gradients over micro-batches (a host loop over the jitted gradient, so images
of any size work) and applies one optax update. The update refuses a non-finite gradient: the
parameters and optimizer state stay as they were and `stats['finite']` is 0, so a bad step never
reaches a checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.rl import losses
from jigsaw_jax.rl.sequences import SequenceBatch


def _array_fields(seq: SequenceBatch):
  return (seq.input_ids, seq.attn_mask, seq.positions,
          seq.pixel_values if seq.grid else None, seq.completion, seq.completion_mask)


def completion_scores(model: mllm.VisionLanguageModel, params, input_ids, attn_mask, positions,
                      pixel_values, completion, grid, temperature: float):
  """log p(completion token) and the entropy at each completion position, float32 [R, T].

  Logits are computed only at the T positions that predict completion tokens, so the [R, L+T, V]
  tensor over the whole sequence is never materialised.
  """
  t = completion.shape[1]
  out = model.apply(params, input_ids, positions, attn_mask, pixel_values, grid or None,
                    return_hidden=True, return_logits=False)
  hidden = out.hidden[:, -t - 1:-1]
  logits = model.apply(params, hidden, method=lambda m, h: m.decoder.logits(h))
  logits = logits / temperature
  return losses.token_log_probs(logits, completion), losses.entropy(logits)


class PolicySteps:
  """Jitted scoring, gradient and update functions for one model and optimizer."""

  def __init__(self, model_cfg: ModelConfig, loss_cfg: losses.LossConfig,
               optimizer: optax.GradientTransformation, temperature: float = 1.0,
               trainable: Optional[Callable[[Any], Any]] = None):
    self.model = mllm.VisionLanguageModel(model_cfg)
    self.loss_cfg = loss_cfg
    self.loss_fn = losses.get(loss_cfg.name)
    self.optimizer = optimizer
    self.temperature = temperature
    self._score = jax.jit(self._score_impl, static_argnames=("grid",))
    self._grads = jax.jit(self._grads_impl, static_argnames=("grid",))
    self._update = jax.jit(self._update_impl, donate_argnums=(0, 1))

  # -- scoring (old / reference log-probs) --------------------------------------------------

  def _score_impl(self, params, input_ids, attn_mask, positions, pixel_values, completion,
                  completion_mask, *, grid):
    del completion_mask
    return completion_scores(self.model, params, input_ids, attn_mask, positions, pixel_values,
                             completion, grid, self.temperature)

  def score(self, params, seq: SequenceBatch):
    """(logp, entropy) float32 [R, T] of the batch's completions under `params`."""
    return self._score(params, *_array_fields(seq), grid=seq.grid)

  # -- gradients ----------------------------------------------------------------------------

  def _grads_impl(self, params, input_ids, attn_mask, positions, pixel_values, completion,
                  completion_mask, advantages, old_logp, ref_logp, *, grid):
    def objective(p):
      logp, entropy = completion_scores(self.model, p, input_ids, attn_mask, positions,
                                        pixel_values, completion, grid, self.temperature)
      old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
      loss, metrics = self.loss_fn(logp, old, ref_logp, advantages, completion_mask,
                                   self.loss_cfg)
      tokens = jnp.maximum(completion_mask.sum(), 1.0)
      metrics = dict(metrics, entropy=(jax.lax.stop_gradient(entropy) * completion_mask).sum()
                     / tokens)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, loss, metrics

  def grads(self, params, seq: SequenceBatch, advantages, old_logp=None, ref_logp=None):
    return self._grads(params, *_array_fields(seq), advantages, old_logp, ref_logp,
                       grid=seq.grid)

  # -- update -------------------------------------------------------------------------------

  def _update_impl(self, params, opt_state, grads):
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state),
            {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)})

  def apply_update(self, params, opt_state, grads):
    return self._update(params, opt_state, grads)


def mean_trees(trees):
  """Element-wise mean of a list of equally shaped pytrees (micro-batch gradients)."""
  return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0, grad_clip: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, end_learning_rate: float = 0.0,
                   mask: Any = None) -> optax.GradientTransformation:
  """AdamW with a linear schedule to `end_learning_rate` (Jigsaw-R1: lr 1e-6 -> 0, no warmup,
  weight decay 0, global-norm clip 1.0, HF Trainer's betas and eps)."""
  decay = optax.linear_schedule(learning_rate, end_learning_rate,
                                max(total_steps - warmup_steps, 1))
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                    decay], [warmup_steps]) if warmup_steps else decay)
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  tx = optax.chain(*chain)
  return optax.masked(tx, mask) if mask is not None else tx
