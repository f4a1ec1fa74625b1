"""Proxy-RLHF on full 2x1 puzzles (with the 1x2 swap), non-thinking: a small proxy accepts or
rejects the tokens a frozen policy proposes, trained by RL on the puzzle rewards.

  # A frozen Qwen2.5-VL-3B steered by a proxy of ~0.03% of its parameters, on a pod:
  python -m jigsaw_jax.main --config=configs/proxy_2x1.py --workdir=/ckpt/proxy_2x1 \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.source.kind=folder --config.data.source.path=/data/coco/train2014 \
      --config.data.source.test_hf_dataset=/data/jigsaw-r1-coco  # the reference's test set
  # Steering a policy another run trained (GRPO or SFT) instead of the checkpoint as loaded:
  python -m jigsaw_jax.main --config=configs/proxy_2x1.py --workdir=/ckpt/proxy_on_sft \
      --config.init_from=/ckpt/sft_2x1 ...
  # The CPU miniature: format pretraining of the tiny policy (the frozen base), then the proxy;
  # accuracy of the base alone and of base + proxy on held-out puzzles:
  python -m jigsaw_jax.main --config=configs/proxy_2x1.py:tiny --workdir=/tmp/proxy_2x1
"""

import ml_collections

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.task = "proxy"
  c.data.pipeline.puzzle.m, c.data.pipeline.puzzle.n = 2, 1
  c.data.pipeline.puzzle.question_type = "full"
  c.data.pipeline.puzzle.think = False
  c.eval.sizes = ("2x1", "1x2", "3x1", "4x1", "2x2", "3x3")

  # The MDP and the proxy network (jigsaw_jax/rl/proxy/ documents every choice). The plausible
  # set the policy proposes from is the rollout's temperature / top_k / top_p.
  c.proxy = ml_collections.ConfigDict(dict(
      layer=-1,  # the policy residual stream it reads: entering this layer; -1 = after the last
      hidden_dim=256,  # 3B: ~1.1M parameters, 0.03% of the policy
      init_accept_logit=2.0,  # untrained: accept with p = 0.88 everywhere
      calibration_batches=4,  # rollouts whose decision states set the proxy's input statistics
      max_rejections=4,  # per position; never the last plausible token
      fallback="sample",  # past the cap: sample | first_rejected
      rejection_cost=0.0,  # subtracted from the episode's reward per rejection
      credit="prefix",  # prefix: per-position group baselines | episode: GRPO's, one per episode
      objective="mirrored",  # mirrored | reinforce (jigsaw_jax/rl/proxy/, proxy_loss)
      aggregation="episode_mean",  # episode_mean | decision_mean
      entropy_coef=0.0,
      eval_deterministic=True,  # evaluation: accept iff p(accept) >= 0.5 (candidates greedy)
  ))
  # The proxy starts from scratch: a learning rate for a small new network, not a fine-tune's.
  # GRPO's knobs that apply: rl.advantage, rl.epsilon_low/high, rl.num_iterations,
  # rl.micro_batches; no KL (the policy is frozen, so the output never leaves its support).
  c.rl.beta = 0.0
  c.optim.learning_rate = 1e-4
  c.optim.end_learning_rate = 1e-5
  c.optim.warmup_steps = 20
  c.total_steps = 1000

  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      base_config.apply_miniature(c)
      c.proxy.hidden_dim = 64  # 17K parameters: 1.6% of tiny_jigsaw's 1.09M
      # A linear probe of the frozen base finds the puzzle best in the residual stream entering
      # layer 2 of 4 (70% held-out, against 68% after the last layer and 51% at the embedding).
      c.proxy.layer = 2
      c.proxy.init_accept_logit = 1.0  # p(accept) = 0.73: rejects explored from the start
      # The knowledge-aware set: at T=1 the base is sure of the separator and EOS (the proxy is
      # not asked there) and torn between "1" and "2" for each index (the proxy decides).
      c.rollout.top_p = 0.9
      c.optim.learning_rate = 3e-3
      c.optim.end_learning_rate = 3e-4
      c.optim.warmup_steps = 5
      c.total_steps = 600  # ~0.15 s a step on two shared cores (a GRPO step: ~5 s)
      c.eval.every_steps = 0
  configlib.apply_fields(c, fields)
  return c
