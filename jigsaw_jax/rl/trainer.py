"""GRPO training: the `grpo` task of `jigsaw_jax.main`.

One function, top to bottom, in sections (the big_vision way): set-up, mesh, policy, data,
optimizer and step functions, restore, evaluation, then the loop. Each step:

    grain batch (B puzzles x G copies) -> rollout (prefill once per puzzle, G samples)
      -> rewards (host) [-> more batches until B groups carry a signal: DAPO's dynamic sampling]
      -> advantages -> mu x [micro-batched grads -> one optax update]
      -> metrics (clu) -> checkpoint (Orbax, with the data iterator state)
"""

from __future__ import annotations

import os
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax import evaluate as evaluate_lib
from jigsaw_jax import metrics as metrics_lib
from jigsaw_jax import sharding as sharding_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.processing import collate
from jigsaw_jax.rl import advantages as advantages_lib
from jigsaw_jax.rl import dynamic_sampling
from jigsaw_jax.rl import losses as losses_lib
from jigsaw_jax.rl import pretrain as pretrain_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.sequences import build_sequences, split_rows
from jigsaw_jax.rl.steps import PolicySteps, make_optimizer, mean_trees
from jigsaw_jax.rollout.sampler import RolloutConfig, Sampler
from jigsaw_jax.rollout.sampling import SamplingConfig


def loss_config(config) -> losses_lib.LossConfig:
  rl = config.rl
  return losses_lib.LossConfig(
      name=rl.loss, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high, beta=rl.beta,
      kl_estimator=rl.kl_estimator, max_completion_length=config.rollout.max_new_tokens)


def vision_placeholder_ids(model_cfg) -> tuple:
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


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Runs GRPO as `config` says; returns the final step's metrics."""
  # ----------------------------------------------------------------------------------------
  # Set-up.
  # ----------------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  sharding_lib.maybe_initialize_distributed(config.distributed)
  rng = jax.random.key(config.seed)
  writer = metrics_lib.create_writer(workdir)
  metrics_lib.write_config(writer, config)
  group = int(config.data.pipeline.group_size)
  if group < 2:
    raise ValueError("GRPO needs config.data.pipeline.group_size >= 2 samples per puzzle.")
  if config.rl.dynamic_sampling and int(config.rl.max_draws) < 1:
    raise ValueError("config.rl.max_draws (batches drawn per step with dynamic sampling) must be "
                     f">= 1; got {config.rl.max_draws}.")

  # ----------------------------------------------------------------------------------------
  # Mesh and policy.
  # ----------------------------------------------------------------------------------------
  mesh = sharding_lib.mesh_from_config(config.mesh)
  rules = sharding_lib.normalize_rules(config.mesh.rules)
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  param_shardings = sharding_lib.logical_to_sharding(policy_lib.abstract_params(model_cfg), mesh,
                                                     rules)
  rng, init_rng = jax.random.split(rng)
  params = policy_lib.initial_params(config.model, model_cfg, init_rng, param_shardings)
  if config.pretrain.steps:
    params = pretrain_lib.pretrain(config, model_cfg, processor, params, workdir)
  if config.init_from:
    params = restore_lib.policy_variables(config, config.init_from, params)
  # With config.adapter the base is frozen outside the train state: `params` (trained, saved)
  # becomes the adapter collection, and the policy is adapters_lib.join(params, frozen).
  model_cfg, params, frozen = policy_lib.attach_adapter(config, model_cfg, params, init_rng)
  # The update donates the params' buffers, so the KL reference gets its own copy (adapter runs
  # need none: their reference is the same weights with the adapters switched off).
  initial_params = jax.tree_util.tree_map(jnp.copy, params) \
      if config.rl.beta and not frozen else None
  optimizer = optimizer_for(config)

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
  # Scoring runs each prompt once for its G samples (config.rl.share_prompt=False: row by row).
  # Scoring, gradients and the update are jitted with explicit in/out shardings on the mesh:
  # params and Adam state where the logical-axis rules put them, batch rows over data x fsdp.
  steps = PolicySteps(model_cfg, loss_config(config), optimizer, config.rollout.temperature,
                      share_prompt=bool(config.rl.share_prompt), mesh=mesh, rules=rules)
  opt_state = steps.init_optimizer(params)  # created already sharded
  sampler = Sampler(model_cfg, rollout_config(config, model_cfg, processor, group))
  advantage_fn = advantages_lib.get(config.rl.advantage)

  # ----------------------------------------------------------------------------------------
  # Restore (params, optimizer, step, PRNG key and the data position).
  # ----------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config.checkpoint)
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0), "rng": rng}
  state = restore_lib.resume(ckpt, state, data_iter)
  # The KL reference is the initial policy; with beta = 0 it is never computed.
  ref_params = initial_params if config.rl.beta != 0.0 else None
  policy = lambda: adapters_lib.join(state["params"], frozen)  # all variables of the policy

  def reference_logp(seq):
    if config.rl.beta == 0.0:
      return None
    if frozen:
      return steps.score(policy(), seq, adapters_enabled=False)[0]
    return steps.score(ref_params, seq)[0]

  # ----------------------------------------------------------------------------------------
  # Evaluation.
  # ----------------------------------------------------------------------------------------
  evaluator = None
  if config.eval.every_steps or config.eval.at_start or config.eval.at_end:
    evaluator = evaluate_lib.Evaluator(model_cfg, processor, config.data, config.eval,
                                       processor.special_ids.eos_ids)

  def run_eval(step: int):
    records, samples = evaluator(policy(), step)
    evaluate_lib.append_records(workdir, records, samples)
    evaluate_lib.write_gallery(os.path.join(workdir, f"gallery_step{step}.png"), samples)
    metrics_lib.write_scalars(writer, step, {
        f"eval/{r['question_type']}_{'think' if r['think'] else 'nothink'}_{r['size']}/accuracy":
        r["accuracy"] for r in records})
    metrics_lib.console(f"eval at step {step}:\n{metrics_lib.eval_table(records)}")
    return records

  # ----------------------------------------------------------------------------------------
  # Loop.
  # ----------------------------------------------------------------------------------------
  start_step = int(state["step"])
  total_steps = int(config.total_steps)
  report_progress = metrics_lib.create_report_progress(
      writer, total_steps, phase="GRPO", checkpointer=ckpt,
      max_nonfinite=config.optim.max_nonfinite_updates)
  timer = metrics_lib.StepTimer(report_progress)
  if evaluator is not None and config.eval.at_start and start_step == 0:
    run_eval(0)
  last_metrics: Dict[str, Any] = {}
  bucket = int(config.rollout.prompt_bucket)

  def draw_groups(rollout_rng):
    """One batch of puzzles from the input, rolled out G times each and scored: the Groups and
    their collated prompts."""
    with timer.phase("data"):
      encoded, puzzles = rollout_rewards.unique_encoded(next(data_iter), group, processor)
      prompts = collate(encoded, processor.pad_token_id, bucket)

    with timer.phase("rollout"):
      rollout = jax.block_until_ready(sampler.generate(policy(), prompts, rollout_rng))
      tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)

    with timer.phase("reward"):
      texts = rollout_rewards.decode_completions(processor, tokens, mask)
      scores = rollout_rewards.score_texts(puzzles, texts, group,
                                           **rollout_rewards.reward_options(config))
      rewards = scores["total"]
      if config.rl.overlong_buffer:
        rewards = rewards + np.asarray(advantages_lib.overlong_penalty(
            mask.sum(-1), config.rollout.max_new_tokens, config.rl.overlong_buffer)).reshape(
                rewards.shape)
    return dynamic_sampling.Groups(encoded, puzzles, tokens, mask, texts, scores,
                                   rewards), prompts

  for step in range(start_step + 1, total_steps + 1):
    step_rng = jax.random.fold_in(state["rng"], step)
    first, first_prompts = draw_groups(step_rng)
    draws = [first]
    if config.rl.dynamic_sampling:
      wanted = len(draws[0])
      while len(draws) < int(config.rl.max_draws) and dynamic_sampling.any_process(
          dynamic_sampling.count_informative(draws) < wanted):
        # Keys of later draws stay clear of fold_in(step_rng, iteration + 1), adapter dropout's.
        draws.append(draw_groups(jax.random.fold_in(step_rng, len(draws) + 1000))[0])
      groups = dynamic_sampling.fill_batch(draws, wanted)
    else:
      groups = first
    # Reward metrics describe the policy's samples: every draw, not just the groups kept.
    drawn = dynamic_sampling.Groups.concat(draws) if len(draws) > 1 else groups
    puzzles, texts, scores, rewards = groups.puzzles, groups.texts, groups.scores, groups.rewards
    tokens, mask = groups.tokens, groups.mask
    lengths = drawn.mask.sum(-1)
    adv = np.asarray(advantage_fn(rewards), np.float32).reshape(-1)

    with timer.phase("update"):
      # Groups picked across draws need collating anew; a single draw's prompts are reused.
      prompts = (first_prompts if groups is first else
                 collate(groups.encoded, processor.pad_token_id, bucket))
      seq = build_sequences(model_cfg, prompts, tokens, mask, group)
      micro = list(split_rows(seq, int(config.rl.micro_batches)))
      adv_micro = np.split(adv, len(micro))
      ref_logps = [reference_logp(m) for m in micro]
      old_logps = [None] * len(micro)
      if config.rl.num_iterations > 1:
        old_logps = [steps.score(policy(), m)[0] for m in micro]
      for iteration in range(int(config.rl.num_iterations)):
        dropout_rng = (jax.random.fold_in(step_rng, iteration + 1)
                       if frozen and config.adapter.dropout else None)
        results = [steps.grads(policy(), m, a, o, r,
                               None if dropout_rng is None else jax.random.fold_in(dropout_rng, i))
                   for i, (m, a, o, r) in enumerate(zip(micro, adv_micro, old_logps, ref_logps))]
        grads = mean_trees([g for g, _, _ in results])
        params, opt_state, update_stats = steps.apply_update(state["params"], state["opt_state"],
                                                             grads)
        state = dict(state, params=params, opt_state=opt_state)
      loss = float(np.mean([float(l) for _, l, _ in results]))
      loss_metrics = jax.tree_util.tree_map(lambda *x: float(np.mean(x)),
                                            *[m for _, _, m in results])
      jax.block_until_ready(state["params"])
    state["step"] = jnp.int32(step)
    timer.add_tokens(int(lengths.sum()))

    finite = float(update_stats["finite"]) == 1.0
    if not finite:
      logging.warning("step %d: non-finite gradient; the update was skipped.", step)
    last_metrics = {
        "reward/total": drawn.rewards.mean(), "reward/accuracy": drawn.scores["accuracy"].mean(),
        "reward/format": drawn.scores["format"].mean(),
        "reward/correct": drawn.scores["correct"].mean(),
        "reward/zero_variance_groups": float(
            np.mean(advantages_lib.zero_variance_groups(drawn.rewards))),
        "completion/length_tokens": lengths.mean(), "loss": loss, **loss_metrics,
        "grad_norm": float(update_stats["grad_norm"]), "skipped_update": 0.0 if finite else 1.0,
        **timer.finish_step()}
    if config.rl.dynamic_sampling:
      last_metrics["dynamic/draws"] = float(len(draws))
      last_metrics["dynamic/zero_variance_kept"] = float(
          np.mean(advantages_lib.zero_variance_groups(rewards)))
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

  ckpt.wait_until_finished()
  if evaluator is not None and config.eval.at_end and total_steps > start_step:
    run_eval(total_steps)
  ckpt.close()
  writer.flush()
  return last_metrics
