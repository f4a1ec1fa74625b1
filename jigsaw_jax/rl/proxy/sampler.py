"""Proxy-RLHF's decoding: the accept/reject token hook on the shared decode loop.

The MDP is described in proxy.py. At each position the hook proposes candidates from the frozen
policy's plausible set and lets the proxy accept or reject them, in an inner `lax.while_loop` of
at most max_rejections + 1 tries (ended early once every row has accepted); the outer loop over
positions, the prefill and the KV cache are the generate package's. Try 0 at each position uses
the base sampler's key, so a proxy that always accepts reproduces `Sampler.generate` token for
token.

    sampler = ProxySampler(model_cfg, rollout_cfg, ProxyConfig(layer=-1, max_rejections=4))
    out = sampler.generate(policy_params, proxy_params, prompt_batch, jax.random.key(1))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.generate.hooks import lengths
from jigsaw_jax.generate.loop import DecodeState
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig, filter_logits
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.rl.proxy.network import ProxyConfig, embedding_table, network_for

_NEG_INF = -1e30  # what filter_logits writes outside the plausible set
_OUTSIDE = -1e25  # below this a (temperature-scaled) logit is outside the plausible set
_DECIDE_SALT = 0x9E3779B9  # folded into the rng for the accept/reject draws


class ProxyRollout(NamedTuple):
  """G adjacent episodes per prompt (row p*G + g), with every decision the proxy took.

  K = max_rejections + 1 tries per position; decision (row, t, k) is the k-th candidate of
  position t.
  """

  tokens: jax.Array  # int32 [B, T]: the accepted tokens; pad after the first EOS
  logprobs: jax.Array  # float32 [B, T]: the policy's log softmax(logits / T) at each token
  mask: jax.Array  # bool [B, T]: completion tokens up to and including the first EOS
  lengths: jax.Array  # int32 [B]
  states: jax.Array  # [B, T, E]: the policy state the proxy read at each position
  candidates: jax.Array  # int32 [B, T, K]
  accepted: jax.Array  # bool [B, T, K]
  asked: jax.Array  # bool [B, T, K]: the proxy decided (not forced, row still running)
  decision_logp: jax.Array  # float32 [B, T, K]: log pi_proxy(decision) when sampled
  rejections: jax.Array  # int32 [B, T]: rejections at each position


def _try_keys(step_keys: jax.Array, t: jax.Array) -> jax.Array:
  """Try 0 uses the position's own key (the base sampler's); later tries fold in t."""
  later = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, t)
  data = jnp.where(t == 0, jax.random.key_data(step_keys), jax.random.key_data(later))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(step_keys))


_fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))


@dataclasses.dataclass(frozen=True)
class ProxyHook:
  """The token hook: hook_params = (proxy_params, the policy's embedding table [V, E]); the
  model output must carry the tapped policy state. `deterministic` accepts iff p >= 0.5."""

  proxy_cfg: ProxyConfig
  network: nn.Module
  sampling: SamplingConfig
  pad_id: int
  deterministic: bool = False

  def prepare(self, hook_params, rng, rows, steps):
    proxy_params, embedding = hook_params
    return dict(proxy_params=proxy_params, embedding=embedding,
                row_keys=jax.random.split(rng, rows),  # as Sampler: try 0 is the base's draw
                decide_root=jax.random.split(jax.random.fold_in(rng, _DECIDE_SALT), rows))

  def init_records(self, context, model_out, rows, steps):
    tries = self.proxy_cfg.max_rejections + 1
    per_try = lambda dtype, fill=0: jnp.full((rows, steps, tries), fill, dtype)
    state = model_out.tapped
    return dict(
        logprobs=jnp.zeros((rows, steps), jnp.float32),
        states=jnp.zeros((rows, steps, state.shape[-1]), state.dtype),
        candidates=per_try(jnp.int32, self.pad_id), accepted=per_try(jnp.bool_),
        asked=per_try(jnp.bool_), decision_logp=per_try(jnp.float32),
        rejections=jnp.zeros((rows, steps), jnp.int32))

  def choose(self, context, step, model_out, done):
    logits = model_out.logits.astype(jnp.float32)
    chosen, n_rej, cands, acc, asked, dlogp = self._tries(
        context, filter_logits(logits, self.sampling), model_out.tapped,
        _fold(context["row_keys"], step), _fold(context["decide_root"], step), done)
    full = jax.nn.log_softmax(logits / self.sampling.temperature, axis=-1)
    logp = jnp.take_along_axis(full, chosen[:, None], axis=-1)[:, 0]
    return chosen, dict(logprobs=jnp.where(done, 0.0, logp), states=model_out.tapped,
                        candidates=cands, accepted=acc, asked=asked, decision_logp=dlogp,
                        rejections=n_rej)

  def finish(self, state: DecodeState) -> ProxyRollout:
    # Positions after a row's EOS were never visited; their rejection counts stay 0.
    return ProxyRollout(tokens=state.tokens, mask=state.mask, lengths=lengths(state),
                        **state.records)

  def _tries(self, context, allowed, state, step_keys, decide_keys, done):
    """One position: candidates and accept/reject decisions until every row has a token.

    Returns the chosen tokens [B] and this position's per-try records ([B, K] each).
    """
    cfg, tries = self.proxy_cfg, self.proxy_cfg.max_rejections + 1
    rows = allowed.shape[0]
    plausible = allowed > _OUTSIDE
    zeros = lambda dtype: jnp.zeros((rows, tries), dtype)

    def cond(s):
      return (s[0] < tries) & ~jnp.all(s[2])

    def body(s):
      t, banned, settled, chosen, first, n_rej, cands, acc, asked, logp = s
      masked = jnp.where(banned, _NEG_INF, allowed)
      if self.sampling.greedy:
        cand = jnp.argmax(masked, axis=-1).astype(jnp.int32)
      else:
        cand = jax.vmap(jax.random.categorical)(_try_keys(step_keys, t), masked).astype(jnp.int32)
      capped = n_rej >= cfg.max_rejections
      if cfg.fallback == "first_rejected":
        cand = jnp.where(capped, first, cand)
      remaining = jnp.sum(plausible & ~banned, axis=-1)
      forced = capped | (remaining <= 1)
      logit = self.network.apply(context["proxy_params"], state,
                                 jnp.take(context["embedding"], cand, axis=0))
      if self.deterministic:
        accept = logit >= 0.0
      else:
        u = jax.vmap(jax.random.uniform)(_fold(decide_keys, t))
        accept = u < jax.nn.sigmoid(logit)
      ask = ~settled & ~forced
      accept = accept | forced
      reject = ~settled & ~accept
      dlogp = jnp.where(accept, jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit))
      banned = banned | (jax.nn.one_hot(cand, allowed.shape[-1], dtype=jnp.bool_)
                         & reject[:, None])
      first = jnp.where(reject & (n_rej == 0), cand, first)
      chosen = jnp.where(~settled & accept, cand, chosen)
      return (t + 1, banned, settled | accept, chosen, first, n_rej + reject.astype(jnp.int32),
              cands.at[:, t].set(cand), acc.at[:, t].set(accept & ~settled),
              asked.at[:, t].set(ask), logp.at[:, t].set(jnp.where(ask, dlogp, 0.0)))

    init = (jnp.int32(0), jnp.zeros(allowed.shape, jnp.bool_), done,
            jnp.full((rows,), self.pad_id, jnp.int32), jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows,), jnp.int32), jnp.full((rows, tries), self.pad_id, jnp.int32),
            zeros(jnp.bool_), zeros(jnp.bool_), zeros(jnp.float32))
    _, _, _, chosen, _, n_rej, cands, acc, asked, logp = jax.lax.while_loop(cond, body, init)
    return chosen, n_rej, cands, acc, asked, logp


class ProxySampler:
  """`Sampler` (shared prefill, KV cache, EOS) with the proxy's hook in its decode loop.

  `network` defaults to `ProxyNetwork`; any flax module mapping (state [..., E], candidate
  embedding [..., E]) to an accept logit [...] works (the tests script one).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, proxy_cfg: ProxyConfig,
               network: Optional[nn.Module] = None):
    self.model_cfg = model_cfg
    self.cfg = cfg
    self.proxy_cfg = proxy_cfg
    self.network = network or network_for(proxy_cfg, model_cfg)
    self.tap = proxy_cfg.tap_layer(model_cfg.text.num_layers)
    self._hooks = {d: ProxyHook(proxy_cfg, self.network, cfg.sampling, cfg.pad_id, d)
                   for d in (False, True)}
    self.sampler = Sampler(model_cfg, cfg, self._hooks[False], cache_layout="contiguous",
                           tap_layer=self.tap)

  @property
  def compilations(self) -> int:
    return self.sampler.compilations

  def generate(self, params, proxy_params, batch: PromptBatch, rng: jax.Array,
               deterministic: bool = False) -> ProxyRollout:
    """Samples `group_size` episodes per prompt row of `batch` (left-padded).

    `deterministic=True` makes the proxy accept iff p(accept) >= 0.5 (evaluation); the
    candidates follow `cfg.sampling` either way (greedy there proposes the best remaining token).
    """
    return self.sampler.generate(params, batch, rng, (proxy_params, embedding_table(params)),
                                 hook=self._hooks[bool(deterministic)])
