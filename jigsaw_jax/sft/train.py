"""Supervised fine-tuning, the `sft` task of `jigsaw_jax.main`: the paper's SFT baselines, saved
like a GRPO run so that a GRPO run can start from one (`config.init_from`)."""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax.eval import evaluate as evaluate_lib
from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.processing import collate
from jigsaw_jax.rl import components, rollout_rewards
from jigsaw_jax.generate.sampler import Sampler
from jigsaw_jax.sft import pretrain as pretrain_lib
from jigsaw_jax.sft.steps import SupervisedSteps, answer_text, supervised_batch



def _rejection_targets(sampler, params, prompts, puzzles, processor, samples: int, rng):
  """One correct, well-formatted completion per puzzle sampled from the policy (None if none)."""
  out = sampler.generate(params, prompts, rng)
  texts = rollout_rewards.decode_completions(processor, out.tokens, out.mask)
  scores = rollout_rewards.score_texts(puzzles, texts, samples)
  targets = []
  for i in range(len(puzzles)):
    good = np.nonzero((scores["correct"][i] == 1.0) & (scores["format"][i] == 1.0))[0]
    targets.append(texts[i * samples + int(good[0])] if len(good) else None)
  return targets


def train(config, workdir: str):
  """Supervised fine-tuning (the paper's SFT baselines), saved like a GRPO run so that a GRPO run
  can start from it (`config.init_from`): non-thinking on ground-truth answers, thinking on
  completions rejection-sampled from the policy itself (only correct, well-formatted ones)."""
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.create_writer(workdir)
  rng = jax.random.key(config.seed)
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  rng, init_rng = jax.random.split(rng)
  params = policy_lib.initial_params(config.model, model_cfg, init_rng)
  if config.pretrain.steps:
    params = pretrain_lib.pretrain(config, model_cfg, processor, params, workdir)
  # With config.adapter only the adapter trains and is saved; the base stays in `frozen`.
  model_cfg, params, frozen = policy_lib.attach_adapter(config, model_cfg, params, init_rng)
  policy = lambda: adapters_lib.join(state["params"], frozen)
  optimizer = components.optimizer_for(config)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
           "rng": rng}
  steps = SupervisedSteps(model_cfg, optimizer)
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.pipeline.group_size = 1
  data_iter = iter(data_lib.make_dataset(
      data_cfg, record_transform=rollout_rewards.encode_record(processor),
      shard_index=jax.process_index(), shard_count=jax.process_count()))
  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config.checkpoint)
  state = restore_lib.resume(ckpt, state, data_iter)
  mode = config.sft.mode
  if mode not in ("ground_truth", "rejection_sampling"):
    raise ValueError(f"config.sft.mode must be 'ground_truth' or 'rejection_sampling', got {mode!r}.")
  sampler = None
  if mode == "rejection_sampling":
    sampler = Sampler(model_cfg, components.rollout_config(config, model_cfg, processor,
                                                        int(config.sft.samples_per_prompt)))
  evaluator = evaluate_lib.Evaluator(model_cfg, processor, config.data, config.eval,
                                     processor.special_ids.eos_ids)
  if config.eval.at_start and int(state["step"]) == 0:
    evaluate_lib.append_records(workdir, evaluator(policy(), 0)[0])
  bucket = int(config.rollout.prompt_bucket)
  report_progress = metrics_lib.create_report_progress(writer, int(config.total_steps),
                                                       phase="SFT", checkpointer=ckpt)
  for step in range(int(state["step"]) + 1, int(config.total_steps) + 1):
    batch = next(data_iter)
    prompts, puzzles = rollout_rewards.unique_prompts(batch, 1, processor, bucket)
    if mode == "ground_truth":
      targets = [answer_text(p) for p in puzzles]
    else:
      targets = _rejection_targets(sampler, policy(), prompts, puzzles, processor,
                                   int(config.sft.samples_per_prompt),
                                   jax.random.fold_in(state["rng"], step))
    keep = [i for i, t in enumerate(targets) if t is not None]
    loss = None
    if keep:
      encoded = [batch["encoded"][i] for i in keep]
      kept_prompts = collate(encoded, processor.pad_token_id, bucket)
      seq = supervised_batch(model_cfg, processor, kept_prompts, [targets[i] for i in keep],
                             int(config.sft.target_length))
      dropout_rng = (jax.random.fold_in(jax.random.fold_in(state["rng"], step), 1)
                     if frozen and config.adapter.dropout else None)
      params, opt_state, stats = steps.step(state["params"], state["opt_state"], seq, frozen,
                                            dropout_rng)
      state = dict(state, params=params, opt_state=opt_state)
      loss = float(stats["loss"])
    state["step"] = jnp.int32(step)
    metrics_lib.write_scalars(writer, step, {"sft/loss": loss,
                                             "sft/kept_fraction": len(keep) / len(targets)})
    report_progress(step, {"sft/loss": loss})
    ckpt.save(step, state, data_state=data_iter.get_state(), force=step == config.total_steps)
    if config.eval.every_steps and step % config.eval.every_steps == 0:
      evaluate_lib.append_records(workdir, evaluator(policy(), step)[0])
  ckpt.close()
  if config.eval.at_end:
    evaluate_lib.append_records(workdir, evaluator(policy(), int(config.total_steps))[0])
  writer.flush()
  logging.info("SFT finished at step %d.", int(config.total_steps))
  return state
