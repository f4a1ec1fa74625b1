"""Supervised fine-tuning on (prompt, answer) pairs: the SFT baselines and the miniature's
pretraining stage share it.

Targets are answer texts followed by the end-of-turn token; the loss is the mean negative
log-likelihood of the target tokens (the prompt is context only), computed with the same scoring
function GRPO uses, so both see identical inputs.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import Processor, PromptBatch
from jigsaw_jax.puzzles import Puzzle
from jigsaw_jax.puzzles.prompts import index_grid
from jigsaw_jax.rl.sequences import SequenceBatch, build_sequences
from jigsaw_jax.rl.steps import completion_scores


def answer_text(puzzle: Puzzle) -> str:
  """The non-thinking ground-truth answer as the prompt asks for it: an m x n grid or a letter."""
  if puzzle.question_type == "full":
    return index_grid(puzzle.m, puzzle.n, puzzle.solution)
  return str(puzzle.solution)


def target_tokens(processor: Processor, texts: Sequence[str], length: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """Token ids of each text + <|im_end|>, right-padded to `length`; (ids, mask) [N, length]."""
  end = processor.special_ids.im_end
  ids = np.full((len(texts), length), processor.pad_token_id, np.int32)
  mask = np.zeros((len(texts), length), np.float32)
  for row, text in enumerate(texts):
    tokens = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
    if len(tokens) > length:
      raise ValueError(f"The target {text!r} takes {len(tokens)} tokens (with <|im_end|>) but "
                       f"only {length} fit; raise the SFT target length.")
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1.0
  return ids, mask


def supervised_batch(model_cfg: ModelConfig, processor: Processor, prompts: PromptBatch,
                     targets: Sequence[str], length: int) -> SequenceBatch:
  ids, mask = target_tokens(processor, targets, length)
  return build_sequences(model_cfg, prompts, ids, mask, group_size=1)


class SupervisedSteps:
  """A jitted cross-entropy gradient step on SequenceBatches.

  With an adapted model_cfg, `params` are the trainable adapter variables and `frozen` the base
  (`adapters.split`); only the adapter is differentiated, and MoE balance losses are added with
  `adapter.balance_coef`.
  """

  def __init__(self, model_cfg: ModelConfig, optimizer: optax.GradientTransformation):
    self.model = mllm.VisionLanguageModel(model_cfg)
    self.adapter = model_cfg.adapter
    self.optimizer = optimizer
    self._step = jax.jit(self._step_impl, static_argnames=("grid",), donate_argnums=(0, 1))

  def _step_impl(self, params, opt_state, input_ids, attn_mask, positions, pixel_values,
                 completion, completion_mask, frozen, rng, *, grid):
    def nll(p):
      logp, _, *aux = completion_scores(
          self.model, adapters_lib.join(p, frozen), input_ids, attn_mask, positions,
          pixel_values, completion, grid, 1.0, rngs=None if rng is None else {"dropout": rng},
          with_aux=self.adapter is not None)
      tokens = jnp.maximum(completion_mask.sum(), 1.0)
      loss = -(logp * completion_mask).sum() / tokens
      total = loss + self.adapter.balance_coef * aux[0] if aux else loss
      return total, (loss, aux)

    (_, (loss, aux)), grads = jax.value_and_grad(nll, has_aux=True)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    stats = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if aux:
      stats["balance_loss"] = aux[0]
    return optax.apply_updates(params, updates), opt_state, stats

  def step(self, params, opt_state, seq: SequenceBatch, frozen=None, rng=None):
    return self._step(params, opt_state, seq.input_ids, seq.attn_mask, seq.positions,
                      seq.pixel_values if seq.grid else None, seq.completion,
                      seq.completion_mask, {} if frozen is None else frozen, rng, grid=seq.grid)


# -- the `sft` task ------------------------------------------------------------------------------


def _rejection_targets(sampler, params, prompts, puzzles, processor, samples: int, rng):
  """One correct, well-formatted completion per puzzle sampled from the policy (None if none)."""
  from jigsaw_jax.rl import rollout_rewards
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
  import os
  from absl import logging
  from jigsaw_jax.runtime import checkpoint as checkpoint_lib
  from jigsaw_jax.runtime import restore as restore_lib
  from jigsaw_jax import data as data_lib
  from jigsaw_jax import evaluate as evaluate_lib
  from jigsaw_jax import metrics as metrics_lib
  from jigsaw_jax.models import policy as policy_lib
  from jigsaw_jax.models.processing import collate
  from jigsaw_jax.models import adapters as adapters_lib
  from jigsaw_jax.rl import rollout_rewards, trainer
  from jigsaw_jax.rl.steps import make_optimizer
  from jigsaw_jax.rollout.sampler import Sampler

  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.create_writer(workdir)
  rng = jax.random.key(config.seed)
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  rng, init_rng = jax.random.split(rng)
  params = policy_lib.initial_params(config.model, model_cfg, init_rng)
  if config.pretrain.steps:
    from jigsaw_jax.rl import pretrain as pretrain_lib
    params = pretrain_lib.pretrain(config, model_cfg, processor, params, workdir)
  # With config.adapter only the adapter trains and is saved; the base stays in `frozen`.
  model_cfg, params, frozen = policy_lib.attach_adapter(config, model_cfg, params, init_rng)
  policy = lambda: adapters_lib.join(state["params"], frozen)
  optimizer = trainer.optimizer_for(config)
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
    sampler = Sampler(model_cfg, trainer.rollout_config(config, model_cfg, processor,
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
