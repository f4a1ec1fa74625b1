"""What every training task builds from its config: the optimizer, the sampler's settings and
GRPO's loss settings (GRPO, SFT's rejection sampling, Proxy-RLHF and evaluation share them)."""

from __future__ import annotations

from jigsaw_jax.rl.grpo import losses as losses_lib
from jigsaw_jax.rl.optim import make_optimizer
from jigsaw_jax.generate.sampler import RolloutConfig
from jigsaw_jax.generate.sampling import SamplingConfig


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
