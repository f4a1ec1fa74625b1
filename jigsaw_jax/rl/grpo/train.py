"""GRPO training: the `grpo` task of `jigsaw_jax.main`.

One function, top to bottom, in sections (the big_vision way): set-up, mesh, policy, data,
optimizer and the step, restore, evaluation, then the loop. The loop is thin: each iteration is

    GrpoStep(state, data, rng)  (rl/grpo/step.py: rollout, rewards, dynamic sampling, advantages,
                                 the micro-batched update)
      -> metrics (clu) -> checkpoint (Orbax, with the data iterator state) -> eval
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax

from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax.eval import evaluate as evaluate_lib
from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.runtime import sharding as sharding_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.rl import components
from jigsaw_jax.rl import loop as loop_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo import step as grpo_step_lib


def train_and_evaluate(config, workdir: str,
                       rewards: Optional[grpo_step_lib.RewardFn] = None) -> Dict[str, Any]:
  """Runs GRPO as `config` says; returns the final step's metrics. `rewards` replaces the
  rule-based rewards (tests script them)."""
  # ----------------------------------------------------------------------------------------
  # Set-up.
  # ----------------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  sharding_lib.maybe_initialize_distributed(config.distributed)
  rng = jax.random.key(config.seed)
  writer = metrics_lib.create_writer(workdir)
  metrics_lib.write_config(writer, config)
  grpo_step_lib.GrpoConfig.from_config(config)  # checks the rl settings before any work

  # ----------------------------------------------------------------------------------------
  # Mesh and policy.
  # ----------------------------------------------------------------------------------------
  rng, init_rng = jax.random.split(rng)
  mesh, rules, model_cfg, processor, params = components.starting_policy(config, init_rng, workdir)
  # With config.adapter the base is frozen outside the train state: `params` (trained, saved)
  # becomes the adapter collection, and the policy is adapters_lib.join(params, frozen).
  model_cfg, params, frozen = policy_lib.attach_adapter(config, model_cfg, params, init_rng)

  # ----------------------------------------------------------------------------------------
  # Data.
  # ----------------------------------------------------------------------------------------
  dataset = data_lib.make_dataset(
      config.data, record_transform=rollout_rewards.encode_record(processor),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(dataset)

  # ----------------------------------------------------------------------------------------
  # The step: rollout, rewards, dynamic sampling, advantages and the update, jitted on the mesh.
  # ----------------------------------------------------------------------------------------
  grpo_step = grpo_step_lib.GrpoStep.from_config(config, model_cfg, processor, params,
                                                 frozen=frozen, mesh=mesh, rules=rules,
                                                 rewards=rewards)

  # ----------------------------------------------------------------------------------------
  # Restore (params, optimizer, step, PRNG key and the data position).
  # ----------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config.checkpoint)
  state = restore_lib.resume(ckpt, grpo_step.init_state(params, rng), data_iter)

  # ----------------------------------------------------------------------------------------
  # Evaluation.
  # ----------------------------------------------------------------------------------------
  evaluator = None
  if config.eval.every_steps or config.eval.at_start or config.eval.at_end:
    evaluator = evaluate_lib.Evaluator(model_cfg, processor, config.data, config.eval,
                                       processor.special_ids.eos_ids)

  def run_eval(step: int, state):
    records, samples = evaluator(grpo_step.policy(state), step)
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
  if evaluator is not None and config.eval.at_start and start_step == 0:
    run_eval(0, state)
  state, last_metrics = loop_lib.run_steps(config, grpo_step, state, data_iter, ckpt, writer,
                                           "GRPO",
                                           run_eval if evaluator is not None else None)
  if evaluator is not None and config.eval.at_end and total_steps > start_step:
    run_eval(total_steps, state)
  ckpt.close()
  writer.flush()
  return last_metrics
