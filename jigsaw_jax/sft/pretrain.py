"""The CPU miniature's base model: a short supervised stage that teaches the answer FORMAT and a
generic visual skill, but no jigsaw answer.

The paper starts RL from instruct models that answer in the right format at chance accuracy. A
random tiny policy does neither, so before GRPO the miniature trains on a mix of these tasks
(shares set by `pretrain.rotation_fraction` and `pretrain.splice_fraction`, the rest format):

* format: the run's own jigsaw prompts, each image answered twice in the batch with two
  different random answers drawn independently of the image (permutation grids for full
  questions, choice letters for pair questions). The policy learns the answer format and
  nothing about which answer is right: its optimum is an even spread.
* splice (the miniature's choice): "is this one photograph, or two photographs joined?" where a
  joined image is the top (or left) half of one photo above (beside) the bottom (right) half of
  ANOTHER photo, the classic splice-detection pretext. The vision tower learns to see a seam
  between unrelated pictures, the kind of low-level skill a pretrained MLLM brings to
  Jigsaw-R1. It never sees a jigsaw: no image is cut from itself, and the answer is a letter,
  not a permutation; the base stays at chance on jigsaws (step-0 evaluation). Measured: from a
  base whose splice accuracy left chance (77% after 600 steps of 32 rows, half of them splices),
  GRPO moved off chance within 100 steps; from a format-and-rotation base it was still at
  chance at step 250.
* rotation: "by how many degrees was this image rotated?" on images rotated by 0/90/180/270
  (the paper's own visual pretext, its Appendix C). In the miniature's budget the tiny model
  stayed at chance on it (held-out p(true) 0.245 after 300 steps of 16 rows, a quarter of them
  rotations), so the miniature leaves it out; a larger model or budget may not.

The result is saved once under `<workdir>/base` (Orbax) and reused when the run resumes; it is
both GRPO's starting point and its KL reference.
"""

from __future__ import annotations

import math
import os
import string
from typing import List

from absl import logging
import numpy as np

from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax import data as data_lib
from jigsaw_jax.models.processing import Processor, collate
from jigsaw_jax.puzzles.prompts import index_grid, multiple_choice
from jigsaw_jax.sft import steps as sft
from jigsaw_jax.rl.optim import make_optimizer

ROTATIONS = (0, 90, 180, 270)
ROTATION_PROMPTS = {
    "paper": multiple_choice(
        "The input image may have been rotated. By how many degrees clockwise was it rotated?",
        [f"{d} degrees" for d in ROTATIONS]),
    "compact": multiple_choice("Rotated clockwise by?", [f"{d} degrees" for d in ROTATIONS],
                               "compact"),
}


def rotation_example(image: np.ndarray, rng: np.random.Generator, style: str = "paper"):
  """(rotated image, prompt, answer letter); square images keep their shape."""
  k = int(rng.integers(len(ROTATIONS)))
  # np.rot90 turns counter-clockwise; k clockwise quarter turns are -k of them.
  return (np.ascontiguousarray(np.rot90(image, -k)), ROTATION_PROMPTS[style],
          string.ascii_uppercase[k])


SPLICE_CHOICES = ("one photograph", "two different photographs joined together")
SPLICE_PROMPTS = {
    "paper": multiple_choice(
        "Is this image a single photograph, or was it made by joining two different "
        "photographs?", SPLICE_CHOICES),
    "compact": multiple_choice("One photo or two joined?", SPLICE_CHOICES, "compact"),
}


def splice_example(image: np.ndarray, other: np.ndarray, rng: np.random.Generator,
                   style: str = "paper"):
  """(image or a splice of two photos, prompt, letter): half of the time, the top/left half of
  `image` joined to the bottom/right half of `other` (same size), along either axis."""
  if rng.random() < 0.5:
    return image, SPLICE_PROMPTS[style], "A"
  axis = int(rng.integers(2))
  cut = image.shape[axis] // 2
  joined = np.array(image)
  if axis == 0:
    joined[cut:] = other[cut:]
  else:
    joined[:, cut:] = other[:, cut:]
  return joined, SPLICE_PROMPTS[style], "B"


def format_examples(puzzle, rng: np.random.Generator, count: int = 2):
  """`count` copies of (puzzle image, its prompt, an answer in the question's format), with
  distinct random answers drawn independently of the image (all of them when there are fewer):
  permutation grids for full questions, choice letters for pair questions.

  The same image with different answers in one batch leaves nothing about the image to fit: the
  optimum is an even spread over answers. One random answer per image lets the model memorise
  noise, and a base that answers each image with confidence gives GRPO groups whose G samples
  all agree, so no advantage and no learning (measured: every group had zero variance after 25
  steps).
  """
  if puzzle.question_type == "pair":
    letters = string.ascii_uppercase[:int(puzzle.num_choices)]
    picks = rng.choice(len(letters), size=min(count, len(letters)), replace=False)
    return [(puzzle.image, puzzle.prompt, letters[int(i)]) for i in picks]
  size = puzzle.m * puzzle.n
  answers: List[np.ndarray] = []
  while len(answers) < min(count, math.factorial(size)):
    answer = rng.permutation(size) + 1
    if not any(np.array_equal(answer, a) for a in answers):
      answers.append(answer)
  return [(puzzle.image, puzzle.prompt, index_grid(puzzle.m, puzzle.n, a)) for a in answers]


def pretrain(config, model_cfg, processor: Processor, params, workdir: str):
  """Returns the base params: restored from `<workdir>/base` or trained and saved there."""
  p = config.pretrain
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "base"), max_to_keep=1,
                                     async_save=False)
  restored = ckpt.restore({"params": params})
  if restored is not None:
    logging.info("Loaded the pretrained base from %s.", os.path.join(workdir, "base"))
    ckpt.close()
    return restored.state["params"]

  optimizer = make_optimizer(p.learning_rate, p.steps, p.warmup_steps, grad_clip=1.0,
                             end_learning_rate=p.learning_rate * 0.1)
  opt_state = optimizer.init(params)
  steps = sft.SupervisedSteps(model_cfg, optimizer)
  # The run's own jigsaw prompts (same sizes and swaps), from the training split.
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.pipeline.group_size = 1
    data_cfg.pipeline.prompts_per_batch = int(p.batch_size)
    data_cfg.pipeline.seed = int(config.data.pipeline.seed) + 7919  # not GRPO's puzzles
  puzzles = iter(data_lib.make_dataset(data_cfg))
  style = str(config.data.pipeline.puzzle.prompt_style)  # pretext prompts worded like the puzzles'
  rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 1]))
  report_progress = metrics_lib.create_report_progress(None, int(p.steps), phase="pretraining")
  for step in range(1, int(p.steps) + 1):
    batch = next(puzzles)
    # A fixed number of rows per step (one compilation): the first shares of the puzzles become
    # rotation and splice examples, the rest format examples, two rows (two answers) per puzzle.
    rows, batch_puzzles = int(p.batch_size), batch["puzzle"]
    rotations = int(round(rows * float(p.rotation_fraction)))
    splices = int(round(rows * float(p.splice_fraction)))
    examples = [rotation_example(puzzle.original, rng, style)
                for puzzle in batch_puzzles[:rotations]]
    for i in range(rotations, rotations + splices):
      other = batch_puzzles[(i + 1) % len(batch_puzzles)].original  # a different photo crop
      examples.append(splice_example(batch_puzzles[i].original, other, rng, style))
    for puzzle in batch_puzzles[rotations + splices:]:
      if len(examples) >= rows:
        break
      examples += format_examples(puzzle, rng, min(2, rows - len(examples)))
    prompts = collate([processor.encode_prompt(text, image) for image, text, _ in examples],
                      processor.pad_token_id, int(config.rollout.prompt_bucket))
    seq = sft.supervised_batch(model_cfg, processor, prompts, [a for _, _, a in examples],
                               int(p.target_length))
    params, opt_state, stats = steps.step(params, opt_state, seq)
    report_progress(step, {"loss": stats["loss"]})
    if step % 50 == 0 or step == p.steps:
      logging.info("pretrain step %d/%d: loss %.4f", step, p.steps, float(stats["loss"]))
  ckpt.save(int(p.steps), {"params": params}, force=True)
  ckpt.close()
  return params
