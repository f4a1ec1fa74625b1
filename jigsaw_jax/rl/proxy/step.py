"""One Proxy-RLHF step as a unit: (train state, puzzles, rng) -> (train state, metrics, records).

The same kind of unit as GRPO's `GrpoStep` (rl/grpo/step.py), for the proxy's MDP
(rl/proxy/network.py): the policy is frozen and only the proxy trains.

    grain batch (B puzzles x G copies) -> episodes (policy proposes, proxy accepts / rejects,
      all inside one jitted while_loop) -> rewards (host) - rejection_cost x rejections
      -> advantages [B, G] -> mu x [clipped policy gradient on the decisions -> optax update]

`state` is {"proxy", "opt_state", "step", "rng"}, what the proxy trainer checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterator, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.models.processing import Processor
from jigsaw_jax.rl.grpo import advantages as advantages_lib
from jigsaw_jax.rl.proxy import loss as proxy_loss_lib
from jigsaw_jax.rl.proxy import network as proxy_lib
from jigsaw_jax.rl.proxy import sampler as proxy_sampler
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo.step import RewardFn
from jigsaw_jax.rl.optim import guarded_update


@dataclasses.dataclass(frozen=True)
class ProxyStepConfig:
  """What one proxy step needs from the experiment config, checked once."""

  group_size: int
  prompt_bucket: int
  rejection_cost: float = 0.0
  credit: str = "prefix"  # prefix: per position among episodes sharing it; episode: GRPO's
  advantage: str = "grpo"
  micro_batches: int = 1
  num_iterations: int = 1

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError("Proxy-RLHF's group-relative advantages need "
                       "config.data.pipeline.group_size >= 2 episodes per puzzle.")
    if self.credit not in ("prefix", "episode"):
      raise ValueError(f"config.proxy.credit must be 'prefix' or 'episode'; got {self.credit!r}.")
    if self.micro_batches < 1 or self.num_iterations < 1:
      raise ValueError("config.rl.micro_batches and config.rl.num_iterations must be >= 1.")
    advantages_lib.get(self.advantage)

  @classmethod
  def from_config(cls, config) -> "ProxyStepConfig":
    return cls(group_size=int(config.data.pipeline.group_size),
               prompt_bucket=int(config.rollout.prompt_bucket),
               rejection_cost=float(config.proxy.rejection_cost), credit=config.proxy.credit,
               advantage=config.rl.advantage, micro_batches=int(config.rl.micro_batches),
               num_iterations=int(config.rl.num_iterations))


@dataclasses.dataclass(frozen=True)
class ProxyRecords:
  """The step's episodes: puzzles, completion texts, rule-based scores [B, G], the rewards the
  advantages came from (scores minus the rejection cost) and the raw rollout."""

  puzzles: List[Any]
  texts: List[str]
  scores: Dict[str, np.ndarray]
  rewards: np.ndarray
  rollout: proxy_sampler.ProxyRollout

  @property
  def generated_tokens(self) -> int:
    return int(np.asarray(self.rollout.mask).sum())


def split_episodes(rollout: proxy_sampler.ProxyRollout, parts: int) -> List[proxy_sampler.ProxyRollout]:
  """`parts` consecutive row blocks of a rollout (micro-batches)."""
  rows = rollout.tokens.shape[0]
  if rows % parts:
    raise ValueError(f"{rows} episodes do not split into {parts} micro-batches; make "
                     "prompts_per_batch * group_size a multiple of config.rl.micro_batches.")
  size = rows // parts
  return [jax.tree_util.tree_map(lambda x: x[i * size:(i + 1) * size], rollout)
          for i in range(parts)]


class ProxyStep:
  """The Proxy-RLHF step for a frozen `policy`, its proxy `network` and `optimizer`."""

  def __init__(self, cfg: ProxyStepConfig, sampler: proxy_sampler.ProxySampler, network,
               loss_cfg: proxy_loss_lib.ProxyLossConfig, optimizer, policy, processor: Processor,
               rewards: RewardFn, max_rejections: int):
    self.cfg, self.sampler, self.policy, self.processor = cfg, sampler, policy, processor
    self.rewards, self.max_rejections = rewards, max_rejections
    self.embedding = proxy_lib.embedding_table(policy)
    self.advantage_fn = advantages_lib.get(cfg.advantage)

    def loss_fn(params, embedding, rollout, adv):
      return proxy_loss_lib.proxy_loss(network, params, embedding, rollout, adv, loss_cfg)

    self._grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    self._update = jax.jit(functools.partial(guarded_update, optimizer), donate_argnums=(0, 1))
    self._init_opt = jax.jit(optimizer.init)

  def init_state(self, proxy_params, rng) -> Dict[str, Any]:
    return {"proxy": proxy_params, "opt_state": self._init_opt(proxy_params),
            "step": jnp.int32(0), "rng": rng}

  def advantages(self, rewards: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> jax.Array:
    if self.cfg.credit == "prefix":
      return jnp.asarray(proxy_loss_lib.prefix_advantages(rewards, tokens, mask))
    return jnp.asarray(np.asarray(self.advantage_fn(rewards), np.float32).reshape(-1))

  def __call__(self, state, batches: Iterator[Dict[str, Any]], rng,
               timer=None) -> Tuple[Dict[str, Any], Dict[str, float], ProxyRecords]:
    timer = timer or metrics_lib.NO_TIMER
    cfg = self.cfg
    with timer.phase("data"):
      prompts, puzzles = rollout_rewards.unique_prompts(next(batches), cfg.group_size,
                                                        self.processor, cfg.prompt_bucket)

    with timer.phase("rollout"):
      rollout = jax.block_until_ready(
          self.sampler.generate(self.policy, state["proxy"], prompts, rng))
      tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)

    with timer.phase("reward"):
      texts = rollout_rewards.decode_completions(self.processor, tokens, mask)
      scores = self.rewards(puzzles, texts, cfg.group_size)
      rejections = np.asarray(rollout.rejections).sum(-1).reshape(scores["total"].shape)
      rewards = scores["total"] - cfg.rejection_cost * rejections
      adv = self.advantages(rewards, tokens, mask)

    with timer.phase("update"):
      micro = split_episodes(rollout, cfg.micro_batches)
      adv_micro = jnp.split(adv, cfg.micro_batches)
      for _ in range(cfg.num_iterations):
        results = [self._grad(state["proxy"], self.embedding, m, a)
                   for m, a in zip(micro, adv_micro)]
        grads = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *[g for _, g in results])
        proxy_params, opt_state, stats = self._update(state["proxy"], state["opt_state"], grads)
        state = dict(state, proxy=proxy_params, opt_state=opt_state)
      loss = float(np.mean([float(l) for (l, _), _ in results]))
      loss_metrics = jax.tree_util.tree_map(lambda *x: float(np.mean(x)),
                                            *[m for (_, m), _ in results])
      jax.block_until_ready(state["proxy"])
    state = dict(state, step=jnp.int32(int(state["step"]) + 1))
    records = ProxyRecords(puzzles, texts, scores, rewards, rollout)
    return state, self.metrics(records, loss, loss_metrics, stats), records

  def metrics(self, records: ProxyRecords, loss: float, loss_metrics: Dict[str, float],
              stats: Dict[str, Any]) -> Dict[str, float]:
    scores, rewards, rollout = records.scores, records.rewards, records.rollout
    mask = np.asarray(rollout.mask)
    rejections = np.asarray(rollout.rejections)
    finite = float(stats["finite"]) == 1.0
    return {
        "reward/total": float(rewards.mean()), "reward/accuracy": float(scores["accuracy"].mean()),
        "reward/format": float(scores["format"].mean()),
        "reward/correct": float(scores["correct"].mean()),
        "reward/zero_variance_groups": float(
            np.mean(advantages_lib.zero_variance_groups(rewards))),
        "proxy/rejections_per_episode": float(rejections.sum(-1).mean()),
        "proxy/capped_positions": float(
            (rejections >= self.max_rejections).sum() / max(mask.sum(), 1)),
        "completion/length_tokens": float(mask.sum(-1).mean()), "loss": loss, **loss_metrics,
        "grad_norm": float(stats["grad_norm"]), "skipped_update": 0.0 if finite else 1.0}
