"""Our GRPO losses against TRL's own GRPOTrainer loss, on the same weights and inputs.

A tiny random Qwen2.5-VL is saved with transformers' save_pretrained; TRL's GRPOTrainer loads that
directory, ours loads it with hf_io. Both score the same prompts (an image each, left-padded) and
fixed completions, with the same old and reference log-probs and advantages, in two
micro-batches: TRL calls `_compute_loss` once per micro-batch as inside one gradient-accumulation
window (current_gradient_accumulation_steps = steps_per_generation = 2, summing the backward
passes, `num_items_in_batch` counting the whole generation batch), ours averages the gradients of
`PolicySteps.grads` with the step's `micro_batch_token_normalizer`, as GrpoStep (rl/grpo/step.py) does. The loss
and every weight's gradient agree to float32 rounding, for grpo, dr_grpo, bnpo, dapo and GSPO
(TRL: importance_sampling_level="sequence"), with and without the KL term.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
import trl

from jigsaw_jax.models import hf_io
from jigsaw_jax.models import tokenizer as tokenizer_lib
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.sequences import build_sequences, split_rows
from jigsaw_jax.rl.optim import make_optimizer, mean_trees, micro_batch_token_normalizer
from jigsaw_jax.rl.policy_steps import PolicySteps
from tests.models.test_mllm import IMAGE, START, END, hf_qwen2_5_vl

GROUP = 2  # samples per prompt
PROMPTS = 4  # two micro-batches of two prompts (four rows) each
MICRO_BATCHES = 2
NEW_TOKENS = 6
GRID = (1, 4, 4)  # one image per prompt: 16 patches, 4 merged tokens
EPS_LOW, EPS_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
  hf_qwen2_5_vl(tie=False).save_pretrained(directory)
  params, cfg = hf_io.load_hf(directory)
  return directory, params, cfg


@pytest.fixture(scope="module")
def batch(checkpoint):
  """The inputs, our training batch and old/ref log-probs off the policy's own."""
  _, params, cfg = checkpoint
  prompts, completion, completion_mask, advantages = _inputs(cfg)
  seq = build_sequences(cfg, prompts, completion, completion_mask, GROUP)
  logp = np.asarray(PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10)).score(
      params, seq)[0])
  noise = np.random.default_rng(1).normal(0, 0.25, (2,) + logp.shape).astype(np.float32)
  old, ref = logp + noise[0], logp + noise[1]  # ratios off 1, both clipping branches active
  return prompts, completion, completion_mask, advantages, seq, old, ref


def _inputs(cfg, seed=0):
  """Left-padded prompts with one image each, G completions of different lengths per prompt
  (a single token, a full-length one), old/ref log-probs off the policy's and advantages."""
  rng = np.random.default_rng(seed)
  v = cfg.vision
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  image_tokens = int(np.prod(GRID)) // v.spatial_merge_size ** 2
  rows = [np.concatenate([rng.integers(0, 280, 1 + 2 * p), [START], [IMAGE] * image_tokens,
                          [END], rng.integers(0, 280, 2)]) for p in range(PROMPTS)]
  length = max(len(r) for r in rows)
  ids = np.zeros((PROMPTS, length), np.int32)
  mask = np.zeros((PROMPTS, length), np.int32)
  for p, r in enumerate(rows):
    ids[p, length - len(r):], mask[p, length - len(r):] = r, 1
  pixels = rng.normal(size=(PROMPTS * int(np.prod(GRID)), patch_dim)).astype(np.float32)
  prompts = PromptBatch(ids, mask, pixels, np.asarray([GRID] * PROMPTS, np.int32))
  n = PROMPTS * GROUP
  completion = rng.integers(0, 280, (n, NEW_TOKENS)).astype(np.int32)
  lengths = np.array([1, NEW_TOKENS, 3, 2, 5, 4, 2, 6])[:n]
  completion_mask = (np.arange(NEW_TOKENS)[None] < lengths[:, None]).astype(np.float32)
  advantages = rng.normal(size=(n,)).astype(np.float32)
  return prompts, completion, completion_mask, advantages


def _trl_trainer(directory, tmp_path, loss_type, level, beta):
  args = trl.GRPOConfig(
      output_dir=str(tmp_path / "trl"), loss_type=loss_type, importance_sampling_level=level,
      beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=NEW_TOKENS,
      num_generations=GROUP, per_device_train_batch_size=PROMPTS * GROUP // MICRO_BATCHES,
      gradient_accumulation_steps=MICRO_BATCHES, steps_per_generation=MICRO_BATCHES,
      # The KL term as Jigsaw-R1's TRL-era trainer computes it, plain k3 (TRL >= 1.x multiplies
      # it by the importance ratio by default).
      use_bias_correction_kl=False,
      temperature=1.0, use_cpu=True, bf16=False, report_to=[], logging_steps=1)
  data = datasets.Dataset.from_dict({"prompt": ["unused"] * (PROMPTS * GROUP)})
  trainer = trl.GRPOTrainer(model=str(directory), args=args, train_dataset=data,
                            reward_funcs=lambda completions, **_: [0.0] * len(completions),
                            processing_class=tokenizer_lib.load_tokenizer())
  trainer.model.train()
  trainer.current_gradient_accumulation_steps = MICRO_BATCHES  # set by Trainer's loop
  return trainer


def _trl_micro_batch(prompts, completion, completion_mask, advantages, old, ref, rows,
                     num_items):
  """TRL's `inputs` for the rows `rows` (prompt and image repeated for each of its G rows)."""
  prompt_of = rows // GROUP
  patches = int(np.prod(GRID))
  pixels = np.concatenate([prompts.pixel_values[p * patches:(p + 1) * patches]
                           for p in prompt_of])
  t = lambda x, dtype=None: torch.tensor(np.asarray(x), dtype=dtype)
  # transformers 5 places image tokens by their type ids (the processor's output; TRL pads them
  # with zeros over the completion).
  types = np.concatenate([prompts.input_ids[prompt_of] == IMAGE,
                          np.zeros((len(rows), completion.shape[1]), bool)], axis=1)
  return {
      "prompt_ids": t(prompts.input_ids[prompt_of], torch.long),
      "prompt_mask": t(prompts.attention_mask[prompt_of], torch.long),
      "completion_ids": t(completion[rows], torch.long),
      "completion_mask": t(completion_mask[rows], torch.long),
      "pixel_values": t(pixels), "image_grid_thw": t([GRID] * len(rows), torch.long),
      "num_images": [1] * len(rows), "mm_token_type_ids": t(types, torch.long),
      "advantages": t(advantages[rows]), "old_per_token_logps": t(old[rows]),
      "ref_per_token_logps": t(ref[rows]), "num_items_in_batch": t(num_items),
  }


LOSSES = [("grpo", "grpo", "token"), ("dr_grpo", "dr_grpo", "token"), ("bnpo", "bnpo", "token"),
          ("dapo", "dapo", "token"), ("gspo", "grpo", "sequence")]
# About 40 s a case on two cores: dapo with KL (the token normaliser over micro-batches and the
# KL term at once) runs in the quick suite, the others are marked slow.
CASES = [pytest.param(*loss, beta, marks=() if (loss[0], beta) == ("dapo", 0.04)
                      else pytest.mark.slow) for loss in LOSSES for beta in (0.0, 0.04)]


@pytest.mark.parametrize("ours_name, trl_type, level, beta", CASES)
def test_loss_and_gradients_match_trl_grpo_trainer(checkpoint, batch, tmp_path, ours_name,
                                                   trl_type, level, beta):
  directory, params, cfg = checkpoint
  prompts, completion, completion_mask, advantages, seq, old, ref = batch
  steps = PolicySteps(cfg, losses.LossConfig(
      name=ours_name, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
      max_completion_length=NEW_TOKENS), make_optimizer(1e-3, 10))

  # Ours: the trainer's accumulation over micro-batches.
  micro = list(split_rows(seq, MICRO_BATCHES))
  size = len(advantages) // MICRO_BATCHES
  cut = lambda x, i: x[i * size:(i + 1) * size]
  normalizer = micro_batch_token_normalizer([m.completion_mask for m in micro])
  results = [steps.grads(params, m, cut(advantages, i), cut(old, i), cut(ref, i),
                         token_normalizer=normalizer) for i, m in enumerate(micro)]
  our_loss = float(np.mean([float(l) for _, l, _ in results]))
  our_grads = dict(hf_io.hf_tensors(mean_trees([g for g, _, _ in results]), cfg))

  # TRL: one accumulation window, the backward passes of its micro-batches summed.
  trainer = _trl_trainer(directory, tmp_path, trl_type, level, beta)
  trainer.model.zero_grad()
  trl_loss = 0.0
  for i in range(MICRO_BATCHES):
    inputs = _trl_micro_batch(prompts, completion, completion_mask, advantages, old, ref,
                              np.arange(i * size, (i + 1) * size), completion_mask.sum())
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    trl_loss += loss.item()

  np.testing.assert_allclose(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
  compared = 0
  for name, p in trainer.model.named_parameters():
    ours = our_grads[hf_io.canonical_name(name)]
    theirs = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
    scale = max(float(np.abs(theirs).max()), 1e-8)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    compared += p.grad is not None and float(np.abs(theirs).max()) > 0
  assert compared > 20  # the decoder's and the vision tower's weights all carry a gradient
