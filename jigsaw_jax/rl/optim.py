"""The optimizer of every training task and the update that refuses a non-finite gradient."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads):
  """One optax update, refused (params and state kept as they were) when the gradient is not
  finite: (params, opt_state, {'grad_norm', 'finite'})."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  return (keep(new_params, params), keep(new_opt_state, opt_state),
          {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)})


def mean_trees(trees):
  """Element-wise mean of a list of equally shaped pytrees (micro-batch gradients)."""
  return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def micro_batch_token_normalizer(completion_masks: Sequence[Any]) -> float:
  """The token count each micro-batch's dapo sum is divided by: the completion tokens of the
  whole step (every micro-batch, every process) over the number of micro-batches, whose
  gradients `mean_trees` averages, so the step's gradient is its token sum over its token count
  however it is split."""
  local = int(sum(np.asarray(m).astype(bool).sum() for m in completion_masks))
  total = local
  if jax.process_count() > 1:
    total = int(np.asarray(multihost_utils.process_allgather(np.int32(local))).sum())
  return max(total, 1) / len(completion_masks)


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
