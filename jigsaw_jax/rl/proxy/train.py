"""Proxy-RLHF training: the `proxy` task of `jigsaw_jax.main` (jigsaw_jax/rl/proxy/ has the MDP).

The policy is frozen; only the proxy's parameters (about 1% of the policy's) are trained, by
policy gradient on its accept/reject decisions with GRPO's group-relative advantages over the G
episodes of a puzzle. Same sections as the GRPO trainer (rl/grpo/train.py), same data, mesh, Orbax
checkpoints (of the proxy only) and clu metrics. Each step:

    grain batch (B puzzles x G copies) -> episodes (policy proposes, proxy accepts / rejects,
      all inside one jitted while_loop) -> rewards (host) - rejection_cost x rejections
      -> advantages [B, G] -> mu x [clipped policy gradient on the decisions -> optax update]

Evaluation runs the frozen base alone once (`<workdir>/eval_frozen_base/`) and base + proxy at
the configured steps (`<workdir>/eval.json`), on the same fixed held-out puzzles as GRPO's; a
summary with the trainable-parameter ratio goes to `<workdir>/proxy_summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import jax

from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax.eval import evaluate as evaluate_lib
from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.runtime import sharding as sharding_lib
from jigsaw_jax.rl import components
from jigsaw_jax.rl import loop as loop_lib
from jigsaw_jax.rl.proxy import loss as proxy_loss_lib
from jigsaw_jax.rl.proxy import network as proxy_lib
from jigsaw_jax.rl.proxy import sampler as proxy_sampler
from jigsaw_jax.rl.proxy import step as proxy_step_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo import step as grpo_step_lib


def proxy_config(config) -> proxy_lib.ProxyConfig:
  return proxy_lib.config_from(config.proxy)


def loss_config(config) -> proxy_loss_lib.ProxyLossConfig:
  return proxy_loss_lib.ProxyLossConfig(
      epsilon_low=float(config.rl.epsilon_low), epsilon_high=float(config.rl.epsilon_high),
      aggregation=config.proxy.aggregation, entropy_coef=float(config.proxy.entropy_coef),
      objective=config.proxy.objective)


def calibrate(config, proxy_params, sampler: proxy_sampler.ProxySampler, policy, processor):
  """The proxy's state statistics, from `proxy.calibration_batches` rollouts of the untrained
  proxy on puzzles of their own stream (so training sees the same batches as a GRPO run)."""
  batches = int(config.proxy.calibration_batches)
  if not batches:
    return proxy_params
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.pipeline.seed = int(config.data.pipeline.seed) + 104729
  stream = iter(data_lib.make_dataset(
      data_cfg, record_transform=rollout_rewards.encode_record(processor),
      shard_index=jax.process_index(), shard_count=jax.process_count()))
  group, bucket = int(config.data.pipeline.group_size), int(config.rollout.prompt_bucket)
  rollouts = []
  for i in range(batches):
    prompts, _ = rollout_rewards.unique_prompts(next(stream), group, processor, bucket)
    rollouts.append(sampler.generate(policy, proxy_params, prompts,
                                     jax.random.key(1_000_003 + i)))
  logging.info("Proxy input statistics from %d decisions.",
               sum(int(r.asked.sum()) for r in rollouts))
  return proxy_lib.calibrate_from_rollouts(proxy_params, rollouts,
                                           proxy_lib.embedding_table(policy))


def train(config, workdir: str, rewards: Optional[grpo_step_lib.RewardFn] = None) -> Dict[str, Any]:
  """Trains the proxy as `config` says; returns the final metrics, evaluations and sizes.
  `rewards` replaces the rule-based rewards (tests script them)."""
  # ----------------------------------------------------------------------------------------
  # Set-up.
  # ----------------------------------------------------------------------------------------
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  sharding_lib.maybe_initialize_distributed(config.distributed)
  rng = jax.random.key(config.seed)
  writer = metrics_lib.create_writer(workdir)
  metrics_lib.write_config(writer, config)
  group = proxy_step_lib.ProxyStepConfig.from_config(config).group_size  # checks the settings
  pcfg = proxy_config(config)

  # ----------------------------------------------------------------------------------------
  # Mesh, the frozen policy and the proxy.
  # ----------------------------------------------------------------------------------------
  rng, init_rng, proxy_rng = jax.random.split(rng, 3)
  mesh, rules, model_cfg, processor, policy = components.starting_policy(config, init_rng, workdir)
  network = proxy_lib.network_for(pcfg, model_cfg)
  proxy_shardings = sharding_lib.logical_to_sharding(
      proxy_lib.abstract_proxy_params(model_cfg, pcfg, network), mesh, rules)
  proxy_params = proxy_lib.init_proxy(model_cfg, pcfg, proxy_rng, proxy_shardings, network)
  sizes = {"policy_params": proxy_lib.count_params(policy),
           "proxy_params": proxy_lib.count_params(proxy_params)}
  sizes["param_ratio"] = sizes["proxy_params"] / sizes["policy_params"]
  logging.info("Proxy: %d trainable parameters, %.2f%% of the frozen policy's %d.",
               sizes["proxy_params"], 100 * sizes["param_ratio"], sizes["policy_params"])
  if sizes["param_ratio"] > 0.05:
    logging.warning("The proxy has %.1f%% of the policy's parameters (Proxy-RLHF aims at ~1%%); "
                    "lower config.proxy.hidden_dim.", 100 * sizes["param_ratio"])

  # ----------------------------------------------------------------------------------------
  # Data.
  # ----------------------------------------------------------------------------------------
  dataset = data_lib.make_dataset(
      config.data, record_transform=rollout_rewards.encode_record(processor),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(dataset)

  # ----------------------------------------------------------------------------------------
  # Step functions.
  # ----------------------------------------------------------------------------------------
  sampler = proxy_sampler.ProxySampler(
      model_cfg, components.rollout_config(config, model_cfg, processor, group), pcfg, network)
  proxy_step = proxy_step_lib.ProxyStep(
      proxy_step_lib.ProxyStepConfig.from_config(config), sampler, network, loss_config(config),
      components.optimizer_for(config), policy, processor,
      grpo_step_lib.rule_rewards(config) if rewards is None else rewards, pcfg.max_rejections)

  # ----------------------------------------------------------------------------------------
  # Restore (proxy, optimizer, step, PRNG key and the data position).
  # ----------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config.checkpoint)
  state = proxy_step.init_state(proxy_params, rng)
  if ckpt.latest_step() is not None:
    state = restore_lib.resume(ckpt, state, data_iter)
  else:
    state["proxy"] = calibrate(config, state["proxy"], sampler, policy, processor)

  # ----------------------------------------------------------------------------------------
  # Evaluation: the frozen base alone, and base + proxy.
  # ----------------------------------------------------------------------------------------
  evaluator = None
  eval_records: Dict[str, Any] = {}
  if config.eval.every_steps or config.eval.at_start or config.eval.at_end:
    evaluator = evaluate_lib.Evaluator(model_cfg, processor, config.data, config.eval,
                                       processor.special_ids.eos_ids)
    base_generate = evaluator.sampler
    with_proxy = evaluate_lib.proxy_sampler(config, evaluator, model_cfg, pcfg)

  def run_eval(step: int, state, base: bool = False):
    evaluator.sampler = base_generate if base else with_proxy
    params = policy if base else (policy, state["proxy"])
    records, samples = evaluator(params, step)
    out_dir = os.path.join(workdir, "eval_frozen_base") if base else workdir
    evaluate_lib.append_records(out_dir, records, samples)
    evaluate_lib.write_gallery(os.path.join(out_dir, f"gallery_step{step}.png"), samples)
    prefix = "eval_frozen_base" if base else "eval"
    metrics_lib.write_scalars(writer, step, {
        f"{prefix}/{r['question_type']}_{'think' if r['think'] else 'nothink'}_{r['size']}"
        "/accuracy": r["accuracy"] for r in records})
    metrics_lib.console(f"{prefix} at step {step}:\n{metrics_lib.eval_table(records)}")
    eval_records["frozen_base" if base else f"step_{step}"] = records
    return records

  # ----------------------------------------------------------------------------------------
  # Loop.
  # ----------------------------------------------------------------------------------------
  start_step = int(state["step"])
  total_steps = int(config.total_steps)
  metrics_lib.write_scalars(writer, start_step, {f"proxy/{k}": v for k, v in sizes.items()})
  if evaluator is not None and config.eval.at_start and start_step == 0:
    run_eval(0, state, base=True)
    run_eval(0, state)
  train_started = time.time()
  state, last_metrics = loop_lib.run_steps(config, proxy_step, state, data_iter, ckpt, writer,
                                           "Proxy-RLHF",
                                           run_eval if evaluator is not None else None)
  train_seconds = time.time() - train_started
  if evaluator is not None and config.eval.at_end and total_steps > start_step:
    run_eval(total_steps, state)
  ckpt.close()
  writer.flush()
  summary = dict(sizes, steps=total_steps, train_seconds=train_seconds,
                 total_seconds=time.time() - started,
                 metrics={k: float(v) for k, v in last_metrics.items()}, eval=eval_records)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "proxy_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
