"""Proxy-RLHF training: the `proxy` task of `jigsaw_jax.main` (jigsaw_jax/rl/proxy.py has the MDP).

The policy is frozen; only the proxy's parameters (about 1% of the policy's) are trained, by
policy gradient on its accept/reject decisions with GRPO's group-relative advantages over the G
episodes of a puzzle. Same sections as the GRPO trainer (rl/trainer.py), same data, mesh, Orbax
checkpoints (of the proxy only) and clu metrics. Each step:

    grain batch (B puzzles x G copies) -> episodes (policy proposes, proxy accepts / rejects,
      all inside one jitted while_loop) -> rewards (host) - rejection_cost x rejections
      -> advantages [B, G] -> mu x [clipped policy gradient on the decisions -> optax update]

Evaluation runs the frozen base alone once (`<workdir>/eval_frozen_base/`) and base + proxy at
the configured steps (`<workdir>/eval.json`), on the same fixed held-out puzzles as GRPO's; a
summary with the trainable-parameter ratio goes to `<workdir>/proxy_summary.json`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax import evaluate as evaluate_lib
from jigsaw_jax import metrics as metrics_lib
from jigsaw_jax import sharding as sharding_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.rl import advantages as advantages_lib
from jigsaw_jax.rl import pretrain as pretrain_lib
from jigsaw_jax.rl import proxy as proxy_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl import trainer as grpo_trainer
from jigsaw_jax.rl.steps import make_optimizer


def proxy_config(config) -> proxy_lib.ProxyConfig:
  return proxy_lib.config_from(config.proxy)


def loss_config(config) -> proxy_lib.ProxyLossConfig:
  return proxy_lib.ProxyLossConfig(
      epsilon_low=float(config.rl.epsilon_low), epsilon_high=float(config.rl.epsilon_high),
      aggregation=config.proxy.aggregation, entropy_coef=float(config.proxy.entropy_coef),
      objective=config.proxy.objective)


def _update(optimizer, params, opt_state, grads):
  """One optax update, refused (state kept) when the gradient is not finite."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  return (keep(new_params, params), keep(new_opt_state, opt_state),
          {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)})


def _rows(rollout: proxy_lib.ProxyRollout, parts: int):
  rows = rollout.tokens.shape[0]
  if rows % parts:
    raise ValueError(f"{rows} episodes do not split into {parts} micro-batches; make "
                     "prompts_per_batch * group_size a multiple of config.rl.micro_batches.")
  size = rows // parts
  return [jax.tree_util.tree_map(lambda x: x[i * size:(i + 1) * size], rollout)
          for i in range(parts)]


def calibrate(config, proxy_params, sampler: proxy_lib.ProxySampler, policy, processor):
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


def train(config, workdir: str) -> Dict[str, Any]:
  """Trains the proxy as `config` says; returns the final metrics, evaluations and sizes."""
  # ----------------------------------------------------------------------------------------
  # Set-up.
  # ----------------------------------------------------------------------------------------
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  sharding_lib.maybe_initialize_distributed(config.distributed)
  rng = jax.random.key(config.seed)
  writer = metrics_lib.create_writer(workdir)
  metrics_lib.write_config(writer, config)
  group = int(config.data.pipeline.group_size)
  if group < 2:
    raise ValueError("Proxy-RLHF's group-relative advantages need "
                     "config.data.pipeline.group_size >= 2 episodes per puzzle.")
  pcfg = proxy_config(config)

  # ----------------------------------------------------------------------------------------
  # Mesh, the frozen policy and the proxy.
  # ----------------------------------------------------------------------------------------
  mesh = sharding_lib.mesh_from_config(config.mesh)
  rules = sharding_lib.normalize_rules(config.mesh.rules)
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  param_shardings = sharding_lib.logical_to_sharding(policy_lib.abstract_params(model_cfg), mesh,
                                                     rules)
  rng, init_rng, proxy_rng = jax.random.split(rng, 3)
  policy = policy_lib.initial_params(config.model, model_cfg, init_rng, param_shardings)
  if config.pretrain.steps:
    policy = pretrain_lib.pretrain(config, model_cfg, processor, policy, workdir)
  if config.init_from:
    policy = restore_lib.policy_variables(config, config.init_from, policy)
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
  o = config.optim
  optimizer = make_optimizer(o.learning_rate, config.total_steps, o.warmup_steps, o.weight_decay,
                             o.grad_clip, o.b1, o.b2, o.eps, o.end_learning_rate)
  opt_state = jax.jit(optimizer.init)(proxy_params)

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
  sampler = proxy_lib.ProxySampler(
      model_cfg, grpo_trainer.rollout_config(config, model_cfg, processor, group), pcfg, network)
  advantage_fn = advantages_lib.get(config.rl.advantage)
  lcfg = loss_config(config)

  def loss_fn(params, embedding, rollout, adv):
    return proxy_lib.proxy_loss(network, params, embedding, rollout, adv, lcfg)

  grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  update_step = jax.jit(functools.partial(_update, optimizer), donate_argnums=(0, 1))
  embedding = proxy_lib.embedding_table(policy)

  # ----------------------------------------------------------------------------------------
  # Restore (proxy, optimizer, step, PRNG key and the data position).
  # ----------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config.checkpoint)
  state = {"proxy": proxy_params, "opt_state": opt_state, "step": jnp.int32(0), "rng": rng}
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

  def run_eval(step: int, base: bool = False):
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
  report_progress = metrics_lib.create_report_progress(
      writer, total_steps, phase="Proxy-RLHF", checkpointer=ckpt,
      max_nonfinite=config.optim.max_nonfinite_updates)
  timer = metrics_lib.StepTimer(report_progress)
  metrics_lib.write_scalars(writer, start_step, {f"proxy/{k}": v for k, v in sizes.items()})
  if evaluator is not None and config.eval.at_start and start_step == 0:
    run_eval(0, base=True)
    run_eval(0)
  last_metrics: Dict[str, Any] = {}
  bucket = int(config.rollout.prompt_bucket)
  cost = float(config.proxy.rejection_cost)
  micro_batches = int(config.rl.micro_batches)
  train_started = time.time()
  for step in range(start_step + 1, total_steps + 1):
    with timer.phase("data"):
      batch = next(data_iter)
      prompts, puzzles = rollout_rewards.unique_prompts(batch, group, processor, bucket)

    with timer.phase("rollout"):
      step_rng = jax.random.fold_in(state["rng"], step)
      rollout = jax.block_until_ready(sampler.generate(policy, state["proxy"], prompts, step_rng))
      tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)

    with timer.phase("reward"):
      texts = rollout_rewards.decode_completions(processor, tokens, mask)
      scores = rollout_rewards.score_texts(puzzles, texts, group,
                                           **rollout_rewards.reward_options(config))
      rejections = np.asarray(rollout.rejections).sum(-1).reshape(scores["total"].shape)
      rewards = scores["total"] - cost * rejections
      if config.proxy.credit == "prefix":
        adv = jnp.asarray(proxy_lib.prefix_advantages(rewards, tokens, mask))
      else:
        adv = jnp.asarray(np.asarray(advantage_fn(rewards), np.float32).reshape(-1))

    with timer.phase("update"):
      micro = _rows(rollout, micro_batches)
      adv_micro = jnp.split(adv, micro_batches)
      for _ in range(int(config.rl.num_iterations)):
        results = [grad_step(state["proxy"], embedding, m, a) for m, a in zip(micro, adv_micro)]
        grads = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *[g for _, g in results])
        proxy_params, opt_state, update_stats = update_step(state["proxy"], state["opt_state"],
                                                            grads)
        state = dict(state, proxy=proxy_params, opt_state=opt_state)
      loss = float(np.mean([float(l) for (l, _), _ in results]))
      loss_metrics = jax.tree_util.tree_map(lambda *x: float(np.mean(x)),
                                            *[m for (_, m), _ in results])
      jax.block_until_ready(state["proxy"])
    state["step"] = jnp.int32(step)
    lengths = mask.sum(-1)
    timer.add_tokens(int(lengths.sum()))

    finite = float(update_stats["finite"]) == 1.0
    if not finite:
      logging.warning("step %d: non-finite gradient; the update was skipped.", step)
    active = mask.sum()
    last_metrics = {
        "reward/total": rewards.mean(), "reward/accuracy": scores["accuracy"].mean(),
        "reward/format": scores["format"].mean(), "reward/correct": scores["correct"].mean(),
        "reward/zero_variance_groups": float(
            np.mean(advantages_lib.zero_variance_groups(rewards))),
        "proxy/rejections_per_episode": rejections.mean(),
        "proxy/capped_positions": float(
            (np.asarray(rollout.rejections) >= pcfg.max_rejections).sum() / max(active, 1)),
        "completion/length_tokens": lengths.mean(), "loss": loss, **loss_metrics,
        "grad_norm": float(update_stats["grad_norm"]), "skipped_update": 0.0 if finite else 1.0,
        **timer.finish_step()}
    if step % int(config.metrics.log_every) == 0 or step == total_steps:
      metrics_lib.write_scalars(writer, step, last_metrics)
    if config.metrics.samples_every and step % int(config.metrics.samples_every) == 0:
      metrics_lib.write_samples(writer, step, [p.prompt for p in puzzles for _ in range(group)],
                                texts, {k: v.reshape(-1) for k, v in scores.items()})
    report_progress(step, last_metrics)
    if finite:
      ckpt.save(step, state, data_state=data_iter.get_state(),
                metadata={"step": step, "reward": float(rewards.mean())},
                force=step == total_steps)
    if evaluator is not None and config.eval.every_steps and step % config.eval.every_steps == 0 \
        and step != total_steps:
      run_eval(step)

  train_seconds = time.time() - train_started
  ckpt.wait_until_finished()
  if evaluator is not None and config.eval.at_end and total_steps > start_step:
    run_eval(total_steps)
  ckpt.close()
  writer.flush()
  summary = dict(sizes, steps=total_steps, train_seconds=train_seconds,
                 total_seconds=time.time() - started,
                 metrics={k: float(v) for k, v in last_metrics.items()}, eval=eval_records)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "proxy_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
