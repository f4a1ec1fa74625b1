"""What every training task builds from its config: the mesh and the starting policy, the
optimizer, the sampler's settings and GRPO's loss settings (GRPO, SFT's rejection sampling,
Proxy-RLHF and evaluation share them)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh

from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import Processor
from jigsaw_jax.rl.grpo import losses as losses_lib
from jigsaw_jax.rl.optim import make_optimizer
from jigsaw_jax.generate.sampler import RolloutConfig
from jigsaw_jax.generate.sampling import SamplingConfig
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax.runtime import sharding as sharding_lib
from jigsaw_jax.sft import pretrain as pretrain_lib


def loss_config(config) -> losses_lib.LossConfig:
  rl = config.rl
  return losses_lib.LossConfig(
      name=rl.loss, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high, beta=rl.beta,
      kl_estimator=rl.kl_estimator, max_completion_length=config.rollout.max_new_tokens)


def vision_placeholder_ids(model_cfg) -> tuple:
  """Token ids a policy must never generate: the image/video placeholders and their brackets."""
  return (model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
          model_cfg.vision_end_token_id)


def rollout_config(config, model_cfg, processor, group_size: int) -> RolloutConfig:
  r = config.rollout
  return RolloutConfig(
      max_new_tokens=r.max_new_tokens, group_size=group_size,
      sampling=SamplingConfig(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                              suppress_ids=vision_placeholder_ids(model_cfg)),
      eos_ids=processor.special_ids.eos_ids, pad_id=processor.pad_token_id)


def optimizer_for(config):
  o = config.optim
  return make_optimizer(o.learning_rate, config.total_steps, o.warmup_steps, o.weight_decay,
                        o.grad_clip, o.b1, o.b2, o.eps, o.end_learning_rate)


class StartingPolicy(NamedTuple):
  mesh: Mesh
  rules: Any  # logical-axis rules, normalised
  model_cfg: ModelConfig
  processor: Processor
  params: Any  # the policy's variables, created in their shards


def starting_policy(config, init_rng: jax.Array, workdir: str) -> StartingPolicy:
  """The mesh and the policy a run starts from: its preset or checkpoint, then the pretraining
  stage (`config.pretrain`), then another run's params (`config.init_from`)."""
  mesh = sharding_lib.mesh_from_config(config.mesh)
  rules = sharding_lib.normalize_rules(config.mesh.rules)
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  shardings = sharding_lib.logical_to_sharding(policy_lib.abstract_params(model_cfg), mesh, rules)
  params = policy_lib.initial_params(config.model, model_cfg, init_rng, shardings)
  if config.pretrain.steps:
    params = pretrain_lib.pretrain(config, model_cfg, processor, params, workdir)
  if config.init_from:
    params = restore_lib.policy_variables(config, config.init_from, params)
  return StartingPolicy(mesh, rules, model_cfg, processor, params)
