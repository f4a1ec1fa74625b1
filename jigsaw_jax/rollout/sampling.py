"""Choosing the next token from logits: greedy, temperature, top-k and top-p, per-row keys.

The filters follow transformers' `generate` (temperature, then top-k, then top-p, always keeping at
least one token), so that our sampling distribution is the one the paper's runs used
(T=1, top-k 50, top-p 1).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 50  # 0 disables
  top_p: float = 1.0  # 1.0 disables
  # Tokens never sampled: the vision placeholders (<|image_pad|> ...), which only the processor
  # may place; a generated one would be taken for an image by the next forward pass.
  suppress_ids: Tuple[int, ...] = ()


def kth_largest(x: jax.Array, k: int) -> jax.Array:
  """The exact k-th largest value of each row of float32 x [B, V], as [B, 1].

  `lax.top_k` sorts and is slow on CPU in a decode loop; this bisects over the 2^32 float bit
  patterns instead (32 passes of compare-and-count), which is exact, including ties.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  # A monotone map from float order to unsigned int order (negative floats flip their magnitude).
  keys = jax.lax.bitcast_convert_type(bits ^ ((bits >> 31) & 0x7FFFFFFF), jnp.uint32) ^ jnp.uint32(
      0x80000000)
  lo, hi = keys.min(-1, keepdims=True), keys.max(-1, keepdims=True)

  def body(_, bounds):  # Invariant: at least k keys >= lo; the answer lies in [lo, hi].
    lo, hi = bounds
    gap = hi - lo
    mid = lo + gap // 2 + (gap & 1)  # ceil, without overflowing uint32
    enough = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return jnp.max(jnp.where(keys == lo, x, -jnp.inf), axis=-1, keepdims=True)


def suppress(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  if not cfg.suppress_ids:
    return logits
  return logits.at[:, jnp.asarray(cfg.suppress_ids)].set(_NEG_INF)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """float32 [B, V] logits with the tokens outside the top-k / top-p support set to -inf."""
  logits = suppress(logits.astype(jnp.float32), cfg) / cfg.temperature
  vocab = logits.shape[-1]
  if 0 < cfg.top_k < vocab:
    kth = kth_largest(logits, cfg.top_k)
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if cfg.top_p < 1.0:
    # Remove the tokens whose cumulative probability, in ascending order, stays <= 1 - top_p.
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - cfg.top_p
    remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the most likely token
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    logits = jnp.where(remove, _NEG_INF, logits)
  return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig):
  """Picks one token per row.

  Args:
    logits: [B, V] raw next-token logits.
    keys: [B] per-row PRNG keys (so a row's sample does not depend on the batch it sits in).

  Returns:
    (tokens int32 [B], logprobs float32 [B]) where logprobs is log softmax(logits / T) at the
    chosen token, the untruncated policy log-probability that the GRPO ratio uses.
  """
  logits = logits.astype(jnp.float32)
  if cfg.greedy:
    tokens = jnp.argmax(suppress(logits, cfg), axis=-1).astype(jnp.int32)
    full = jax.nn.log_softmax(logits, axis=-1)
  else:
    filtered = filter_logits(logits, cfg)
    tokens = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    full = jax.nn.log_softmax(logits / cfg.temperature, axis=-1)
  return tokens, jnp.take_along_axis(full, tokens[:, None], axis=-1)[:, 0]
