"""Generating one puzzle: a pure function of (image, spec, rng)."""

from __future__ import annotations

import numpy as np

from jigsaw_jax.puzzles import cut, prompts, questions
from jigsaw_jax.puzzles.spec import Puzzle, PuzzleSpec


def puzzle_rng(seed: int, index: int) -> np.random.Generator:
  """The generator for puzzle `index` of a run seeded with `seed`.

  A puzzle depends on nothing else, so the G samples of a group (same index) see the identical
  puzzle, a resumed run regenerates the same puzzles, and no global RNG is touched.
  """
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def make_puzzle(image: np.ndarray, spec: PuzzleSpec, rng: np.random.Generator) -> Puzzle:
  """Cuts, shuffles and questions one image.

  Args:
    image: uint8 [H, W, 3] (a greyscale [H, W] image is broadcast to RGB).
    spec: the puzzle family.
    rng: the only source of randomness (see `puzzle_rng`).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"make_puzzle expects a uint8 RGB image of shape [H, W, 3]; got dtype {image.dtype} and "
        f"shape {image.shape}. Convert with np.asarray(PIL.Image.open(p).convert('RGB')).")
  m, n = spec.m, spec.n
  if spec.shuffle_mn and rng.random() < 0.5:
    m, n = n, m
  original = cut.crop_to_grid(image, m, n)
  composite, forward = cut.shuffle_patches(original, m, n, rng)
  composite = cut.mask_borders(composite, m, n, spec.mask_ratio)

  pair = choices = num_choices = None
  if spec.question_type == "full":
    solution = forward
  else:
    k, l, choices, solution = questions.make_pair_question(m, n, forward, rng)
    pair, num_choices = (k, l), len(choices)

  prompt = prompts.puzzle_prompt(
      m, n, spec.question_type, spec.think, mask_ratio=spec.mask_ratio, pair=pair,
      choices=choices or (), instruct_model=spec.instruct_model,
      style=spec.prompt_style)
  return Puzzle(
      image=composite, original=original, m=m, n=n, question_type=spec.question_type,
      think=spec.think, permutation=forward, solution=solution, prompt=prompt,
      num_choices=num_choices, pair=pair, choices=choices, instruct_model=spec.instruct_model)
