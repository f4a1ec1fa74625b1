"""The supervised step on (prompt, answer) pairs: the SFT baselines (sft/train.py) and the
miniature's pretraining stage (sft/pretrain.py) share it.

Targets are answer texts followed by the end-of-turn token; the loss is the mean negative
log-likelihood of the target tokens (the prompt is context only), computed with the same scoring
function GRPO uses, so both see identical inputs.
"""

from __future__ import annotations

from typing import Sequence, Tuple

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
from jigsaw_jax.rl.scoring import completion_scores


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
    self._step = jax.jit(self._step_impl, static_argnames=("layout",), donate_argnums=(0, 1))

  def _step_impl(self, params, opt_state, arrays, frozen, rng, *, layout):
    seq = SequenceBatch.from_parts(arrays, layout)

    def nll(p):
      logp, _, *aux = completion_scores(
          self.model, adapters_lib.join(p, frozen), seq, 1.0,
          rngs=None if rng is None else {"dropout": rng}, with_aux=self.adapter is not None)
      tokens = jnp.maximum(seq.completion_mask.sum(), 1.0)
      loss = -(logp * seq.completion_mask).sum() / tokens
      total = loss + self.adapter.balance_coef * aux[0] if aux else loss
      return total, (loss, aux)

    (_, (loss, aux)), grads = jax.value_and_grad(nll, has_aux=True)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    stats = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if aux:
      stats["balance_loss"] = aux[0]
    return optax.apply_updates(params, updates), opt_state, stats

  def step(self, params, opt_state, seq: SequenceBatch, frozen=None, rng=None):
    return self._step(params, opt_state, seq.arrays(), {} if frozen is None else frozen, rng,
                      layout=seq.layout())
