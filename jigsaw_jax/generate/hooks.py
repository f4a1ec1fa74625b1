"""The plain token choices for the decode loop: sampling (the rollout's) and greedy (argmax).

The other hooks live with their methods: Proxy-RLHF's accept/reject in rl/proxy/network.py, FastMem's
contrastive decoding in fastmem.py.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from jigsaw_jax.generate.loop import DecodeState
from jigsaw_jax.generate.sampling import SamplingConfig, sample_tokens


class Rollout(NamedTuple):
  """G adjacent completions per prompt: row p*G + g is sample g of prompt p."""

  tokens: jax.Array  # int32 [B, max_new_tokens]; pad after the first EOS
  logprobs: jax.Array  # float32 [B, max_new_tokens]: log softmax(logits / T) at each token
  mask: jax.Array  # bool [B, max_new_tokens]: completion tokens up to and including the first EOS
  lengths: jax.Array  # int32 [B]


def lengths(state: DecodeState) -> jax.Array:
  return state.mask.sum(-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SamplingHook:
  """`sample_tokens` with per-row keys: row r's token at step s uses fold_in(split(rng)[r], s),
  so a row's sample does not depend on the batch it sits in. Records the policy's logprobs."""

  sampling: SamplingConfig

  def prepare(self, hook_params, rng, rows, steps):
    row_keys = jax.random.split(rng, rows)
    # Every step's key made before the loop: a threefry loop fewer per step.
    return jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(
        jnp.arange(steps)))(row_keys)  # [rows, steps]

  def init_records(self, step_keys, model_out, rows, steps):
    return {"logprobs": jnp.zeros((rows, steps), jnp.float32)}

  def choose(self, step_keys, step, model_out, done):
    token, logprob = sample_tokens(model_out.logits, step_keys[:, step], self.sampling)
    return token, {"logprobs": jnp.where(done, 0.0, logprob)}

  def finish(self, state: DecodeState) -> Rollout:
    return Rollout(state.tokens, state.records["logprobs"], state.mask, lengths(state))


class Completions(NamedTuple):
  tokens: jax.Array  # int32 [B, max_new_tokens]; pad after the first EOS
  mask: jax.Array  # bool [B, max_new_tokens]: completion tokens up to and including the first EOS


@dataclasses.dataclass(frozen=True)
class GreedyHook:
  """The most likely token of `scores(model_out)` (the model's logits; a subclass may combine
  several models' outputs), never one of `suppress_ids`."""

  suppress_ids: Tuple[int, ...] = ()

  def scores(self, model_out) -> jax.Array:
    return model_out.logits

  def prepare(self, hook_params, rng, rows, steps):
    return None

  def init_records(self, context, model_out, rows, steps):
    return {}

  def choose(self, context, step, model_out, done):
    z = self.scores(model_out)
    if self.suppress_ids:
      z = z.at[:, jnp.asarray(self.suppress_ids)].set(-jnp.inf)
    return jnp.argmax(z, axis=-1).astype(jnp.int32), {}

  def finish(self, state: DecodeState) -> Completions:
    return Completions(state.tokens, state.mask)
