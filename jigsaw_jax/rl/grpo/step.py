"""One GRPO step as a unit: (train state, puzzles, rng) -> (train state, metrics, records).

    step = GrpoStep(GrpoConfig.from_config(config), policy_steps, sampler, processor, rewards)
    state, metrics, records = step(state, batches, rng)

`state` is the trainer's checkpointed dict (params, opt_state, step, rng); `batches` yields the
grain pipeline's batches (B puzzles x G copies): the step takes one, or several under DAPO's
dynamic sampling; `rng` is this step's key. Inside, in order:

    rollout (prefill once per prompt, G samples)  -> rewards (host, `rewards` callable)
      [-> more batches until B groups carry a signal] -> advantages
      -> mu x [micro-batched gradients -> one optax update]

The step owns everything between the input pipeline and the metric writers, so the trainer's
loop, the benchmarks and the tests call exactly this. Rewards come in as a function (the rule-
based Jigsaw-R1 rewards by default; tests pass scripted ones), never patched in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models.processing import Processor, collate
from jigsaw_jax.rl.grpo import advantages as advantages_lib
from jigsaw_jax.rl import components
from jigsaw_jax.rl.grpo import dynamic_sampling
from jigsaw_jax.rl import prompts as prompts_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.sequences import build_sequences, split_rows
from jigsaw_jax.rl.optim import mean_trees, micro_batch_token_normalizer
from jigsaw_jax.rl.policy_steps import PolicySteps
from jigsaw_jax.generate.sampler import Sampler

# (puzzles, completion texts, G) -> {accuracy, format, correct, total}: each [P, G] float32.
RewardFn = Callable[[Sequence[Any], Sequence[str], int], Dict[str, np.ndarray]]
# Keys of later dynamic-sampling draws are fold_in(rng, draw + DRAW_KEY_OFFSET): clear of
# fold_in(rng, iteration + 1), which adapter dropout uses.
DRAW_KEY_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """What one GRPO step needs from the experiment config, checked once."""

  group_size: int
  prompt_bucket: int
  max_new_tokens: int
  advantage: str = "grpo"
  micro_batches: int = 1
  num_iterations: int = 1
  beta: float = 0.0
  dynamic_sampling: bool = False
  max_draws: int = 1
  dynamic_sampling_metric: str = "accuracy"  # what must differ within a group to keep it
  dynamic_sampling_at_cap: str = "fill"  # fill | raise, when max_draws leave the batch short
  overlong_buffer: int = 0
  adapter_dropout: bool = False  # draw adapter-dropout masks in the update

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError("GRPO needs config.data.pipeline.group_size >= 2 samples per puzzle; got "
                       f"{self.group_size}.")
    if self.dynamic_sampling and self.max_draws < 1:
      raise ValueError("config.rl.max_draws (batches drawn per step with dynamic sampling) must "
                       f"be >= 1; got {self.max_draws}.")
    if self.micro_batches < 1 or self.num_iterations < 1:
      raise ValueError("config.rl.micro_batches and config.rl.num_iterations must be >= 1; got "
                       f"{self.micro_batches} and {self.num_iterations}.")
    advantages_lib.get(self.advantage)  # an unknown name fails here, listing the known ones
    dynamic_sampling.check_options(self.dynamic_sampling_metric, self.dynamic_sampling_at_cap)

  @classmethod
  def from_config(cls, config) -> "GrpoConfig":
    rl = config.rl
    return cls(
        group_size=int(config.data.pipeline.group_size),
        prompt_bucket=int(config.rollout.prompt_bucket),
        max_new_tokens=int(config.rollout.max_new_tokens), advantage=rl.advantage,
        micro_batches=int(rl.micro_batches), num_iterations=int(rl.num_iterations),
        beta=float(rl.beta), dynamic_sampling=bool(rl.dynamic_sampling),
        max_draws=int(rl.max_draws), dynamic_sampling_metric=rl.dynamic_sampling_metric,
        dynamic_sampling_at_cap=rl.dynamic_sampling_at_cap,
        overlong_buffer=int(rl.overlong_buffer),
        adapter_dropout=bool(config.adapter.dropout))


def rule_rewards(config) -> RewardFn:
  """The Jigsaw-R1 rewards with `config.reward`'s options."""
  return functools.partial(rollout_rewards.score_texts, **rollout_rewards.reward_options(config))


@dataclasses.dataclass(frozen=True)
class StepRecords:
  """What a step rolled out: the groups the update trained on and every group drawn."""

  groups: dynamic_sampling.Groups
  drawn: dynamic_sampling.Groups
  draws: int

  # What the update trained on, as the training loop logs it.
  puzzles = property(lambda self: self.groups.puzzles)
  texts = property(lambda self: self.groups.texts)
  scores = property(lambda self: self.groups.scores)
  rewards = property(lambda self: self.groups.rewards)

  @property
  def generated_tokens(self) -> int:
    """Tokens the step's rollouts generated (every draw)."""
    return int(self.drawn.mask.sum())


class GrpoStep:
  """The GRPO step for one policy, sampler and optimizer (see the module docstring).

  `frozen`: with adapters, the frozen base variables (the train state holds the adapter only; the
  KL reference is the base with adapters off). `ref_params`: without adapters, the KL reference
  (the initial policy); unused when `cfg.beta` is 0.
  """

  def __init__(self, cfg: GrpoConfig, steps: PolicySteps, sampler: Any, processor: Processor,
               rewards: RewardFn, *, frozen: Any = None, ref_params: Any = None):
    self.cfg, self.steps, self.sampler, self.processor = cfg, steps, sampler, processor
    self.rewards = rewards
    self.frozen, self.ref_params = frozen or {}, ref_params
    self.advantage_fn = advantages_lib.get(cfg.advantage)

  @classmethod
  def from_config(cls, config, model_cfg, processor: Processor, params, *, frozen: Any = None,
                  mesh=None, rules=None, rewards: Optional[RewardFn] = None) -> "GrpoStep":
    """The step `config` describes for the policy `params` (with adapters: the trainable part,
    `frozen` the base). Scoring, gradients and the update are jitted with explicit in/out
    shardings on `mesh`: params and Adam state where the logical-axis rules put them, batch rows
    over data x fsdp. Scoring runs each prompt once for its G samples (config.rl.share_prompt)."""
    cfg = GrpoConfig.from_config(config)
    steps = PolicySteps(model_cfg, components.loss_config(config),
                        components.optimizer_for(config), config.rollout.temperature,
                        share_prompt=bool(config.rl.share_prompt), mesh=mesh, rules=rules)
    sampler = Sampler(model_cfg, components.rollout_config(config, model_cfg, processor,
                                                           cfg.group_size))
    # The update donates the params' buffers, so the KL reference gets its own copy (adapter runs
    # need none: their reference is the same weights with the adapters switched off).
    ref_params = jax.tree_util.tree_map(jnp.copy, params) if cfg.beta and not frozen else None
    return cls(cfg, steps, sampler, processor, rule_rewards(config) if rewards is None else rewards,
               frozen=frozen, ref_params=ref_params)

  def init_state(self, params, rng) -> Dict[str, Any]:
    """The train state at step 0 (the optimizer state created already sharded)."""
    return {"params": params, "opt_state": self.steps.init_optimizer(params),
            "step": jnp.int32(0), "rng": rng}

  def policy(self, state) -> Any:
    """All variables of the policy in `state` (base and adapters)."""
    return adapters_lib.join(state["params"], self.frozen)

  # -- rollout and rewards ------------------------------------------------------------------

  def draw(self, state, batch: Dict[str, Any], rng, timer=None) -> Tuple[
      dynamic_sampling.Groups, prompts_lib.Prompts]:
    """One batch of puzzles rolled out G times each and scored: its Groups and its prompts
    (collated, with their M-RoPE index)."""
    timer = timer or metrics_lib.NO_TIMER
    cfg, processor = self.cfg, self.processor
    with timer.phase("data"):
      encoded, puzzles = rollout_rewards.unique_encoded(batch, cfg.group_size, processor)
      # Collated once, M-RoPE built once: the sampler and the update both use these.
      prompts = prompts_lib.prepare(self.steps.model_cfg, collate(
          encoded, processor.pad_token_id, cfg.prompt_bucket))

    with timer.phase("rollout"):
      rollout = jax.block_until_ready(self.sampler.generate(self.policy(state), prompts.batch,
                                                            rng, prompts.rope))
      tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)

    with timer.phase("reward"):
      texts = rollout_rewards.decode_completions(processor, tokens, mask)
      scores = self.rewards(puzzles, texts, cfg.group_size)
      rewards = scores["total"]
      if cfg.overlong_buffer:
        rewards = rewards + np.asarray(advantages_lib.overlong_penalty(
            mask.sum(-1), cfg.max_new_tokens, cfg.overlong_buffer)).reshape(rewards.shape)
    return dynamic_sampling.Groups(puzzles, tokens, mask, texts, scores, rewards), prompts

  def rollout(self, state, batches: Iterator[Dict[str, Any]], rng,
              timer=None) -> Tuple[StepRecords, prompts_lib.Prompts]:
    """The step's groups (drawing more batches under dynamic sampling) and their prompts."""
    first, prompts = self.draw(state, next(batches), rng, timer)
    draws, draw_prompts = [first], [prompts]
    groups = first
    cfg = self.cfg
    if cfg.dynamic_sampling:
      wanted, metric = len(first), cfg.dynamic_sampling_metric
      while len(draws) < cfg.max_draws and dynamic_sampling.any_process(
          dynamic_sampling.count_informative(draws, metric) < wanted):
        key = jax.random.fold_in(rng, len(draws) + DRAW_KEY_OFFSET)
        more, more_prompts = self.draw(state, next(batches), key, timer)
        draws.append(more)
        draw_prompts.append(more_prompts)
      picked = dynamic_sampling.pick_groups(draws, wanted, metric, cfg.dynamic_sampling_at_cap)
      groups = dynamic_sampling.Groups.concat(draws).take(picked)
      # The picked groups' prompts: rows of the draws' collated prompts, re-padded.
      prompts = prompts_lib.take_rows(draw_prompts, picked, self.steps.model_cfg.image_token_id,
                                      self.processor.pad_token_id, self.cfg.prompt_bucket)
    drawn = dynamic_sampling.Groups.concat(draws) if len(draws) > 1 else groups
    return StepRecords(groups, drawn, len(draws)), prompts

  # -- the update ---------------------------------------------------------------------------

  def _reference_logp(self, state, seq):
    if self.cfg.beta == 0.0:
      return None
    if self.frozen:
      return self.steps.score(self.policy(state), seq, adapters_enabled=False)[0]
    return self.steps.score(self.ref_params, seq)[0]

  def update(self, state, groups: dynamic_sampling.Groups, prompts: prompts_lib.Prompts, rng):
    """mu optax updates on the groups' completions: (state, loss, loss metrics, update stats)."""
    cfg, steps = self.cfg, self.steps
    adv = np.asarray(self.advantage_fn(groups.rewards), np.float32).reshape(-1)
    seq = build_sequences(steps.model_cfg, prompts.batch, groups.tokens, groups.mask,
                          cfg.group_size, prompts.rope)
    micro = list(split_rows(seq, cfg.micro_batches))
    adv_micro = np.split(adv, len(micro))
    ref_logps = [self._reference_logp(state, m) for m in micro]
    old_logps = [None] * len(micro)
    # A token-level loss (dapo) divides by the whole step's tokens however the step is split.
    normalizer = micro_batch_token_normalizer([m.completion_mask for m in micro])
    if cfg.num_iterations > 1:
      old_logps = [steps.score(self.policy(state), m)[0] for m in micro]
    for iteration in range(cfg.num_iterations):
      dropout_rng = (jax.random.fold_in(rng, iteration + 1)
                     if self.frozen and cfg.adapter_dropout else None)
      results = [steps.grads(self.policy(state), m, a, o, r,
                             None if dropout_rng is None else jax.random.fold_in(dropout_rng, i),
                             normalizer)
                 for i, (m, a, o, r) in enumerate(zip(micro, adv_micro, old_logps, ref_logps))]
      grads = mean_trees([g for g, _, _ in results])
      params, opt_state, stats = steps.apply_update(state["params"], state["opt_state"], grads)
      state = dict(state, params=params, opt_state=opt_state)
    loss = float(np.mean([float(l) for _, l, _ in results]))
    loss_metrics = jax.tree_util.tree_map(lambda *x: float(np.mean(x)),
                                          *[m for _, _, m in results])
    jax.block_until_ready(state["params"])
    return state, loss, loss_metrics, stats

  # -- the whole step -----------------------------------------------------------------------

  def __call__(self, state, batches: Iterator[Dict[str, Any]], rng,
               timer=None) -> Tuple[Dict[str, Any], Dict[str, float], StepRecords]:
    """One step: the new state (step count + 1; params unchanged if the gradient was not
    finite), its metrics and what it rolled out. `timer` (metrics.StepTimer) times the phases."""
    timer = timer or metrics_lib.NO_TIMER
    records, prompts = self.rollout(state, batches, rng, timer)
    with timer.phase("update"):
      state, loss, loss_metrics, stats = self.update(state, records.groups, prompts, rng)
    state = dict(state, step=jnp.int32(int(state["step"]) + 1))
    return state, step_metrics(records, loss, loss_metrics, stats, self.cfg), records


def step_metrics(records: StepRecords, loss: float, loss_metrics: Dict[str, float],
                 stats: Dict[str, Any], cfg: GrpoConfig) -> Dict[str, float]:
  """The step's scalars. Reward metrics describe the policy's samples: every draw, not just the
  groups kept."""
  drawn = records.drawn
  finite = float(stats["finite"]) == 1.0
  metrics = {
      "reward/total": float(drawn.rewards.mean()),
      "reward/accuracy": float(drawn.scores["accuracy"].mean()),
      "reward/format": float(drawn.scores["format"].mean()),
      "reward/correct": float(drawn.scores["correct"].mean()),
      "reward/zero_variance_groups": float(
          np.mean(advantages_lib.zero_variance_groups(drawn.rewards))),
      "completion/length_tokens": float(drawn.mask.sum(-1).mean()), "loss": loss,
      **loss_metrics, "grad_norm": float(stats["grad_norm"]),
      "skipped_update": 0.0 if finite else 1.0}
  if cfg.dynamic_sampling:
    metrics["dynamic/draws"] = float(records.draws)
    metrics["dynamic/zero_variance_kept"] = float(
        np.mean(advantages_lib.zero_variance_groups(records.groups.rewards)))
  return metrics
