"""A PNG gallery of puzzles: the original, the puzzle the model sees, the question and the answer.

  python -m jigsaw_jax.puzzles.preview --output preview.png --sizes 2x1,3x3,2x2 \
      --question-types full,pair --source bundled

Use it to check by eye that puzzles are cut, shuffled and labelled right before training.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Sequence

import numpy as np

from jigsaw_jax.puzzles import PuzzleSpec, make_puzzle, puzzle_rng
from jigsaw_jax.puzzles.prompts import index_grid


def _question_excerpt(puzzle) -> str:
  """The part of the prompt after the index grid (the question itself), wrapped for the figure."""
  text = puzzle.prompt.split("```\n\n", 1)[-1].split("\n\nFirst, output")[0]
  text = text.split("\n\nDirectly output")[0]
  return "\n".join(textwrap.fill(line, 60) for line in text.splitlines())


def _answer_text(puzzle) -> str:
  if puzzle.question_type == "full":
    return "answer:\n" + index_grid(puzzle.m, puzzle.n, puzzle.solution)
  return f"answer: {puzzle.solution}"


def render_gallery(images: Sequence[np.ndarray], sizes: Sequence[str],
                   question_types: Sequence[str], output: str, *, think: bool = False,
                   seed: int = 0) -> str:
  """Draws one row per (size, question type) puzzle and writes a PNG to `output`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [(size, q) for size in sizes for q in question_types]
  fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.4 * len(rows)),
                           gridspec_kw={"width_ratios": [1, 1, 1.6]}, squeeze=False)
  for row, (size, question_type) in enumerate(rows):
    m, n = (int(x) for x in size.lower().split("x"))
    spec = PuzzleSpec(m=m, n=n, question_type=question_type, think=think, shuffle_mn=False)
    puzzle = make_puzzle(images[row % len(images)], spec, puzzle_rng(seed, row))
    left, middle, right = axes[row]
    left.imshow(puzzle.original)
    left.set_title(f"original (cropped), {puzzle.size}")
    middle.imshow(puzzle.image)
    middle.set_title(f"puzzle: {question_type}")
    # Thin guides on the figure only; the model's image has no lines or numbers.
    height, width = puzzle.image.shape[:2]
    for i in range(1, puzzle.m):
      middle.axhline(i * height / puzzle.m - 0.5, color="w", lw=0.8, ls=":")
    for j in range(1, puzzle.n):
      middle.axvline(j * width / puzzle.n - 0.5, color="w", lw=0.8, ls=":")
    for slot in range(puzzle.m * puzzle.n):
      r, c = divmod(slot, puzzle.n)
      middle.text((c + 0.5) * width / puzzle.n, (r + 0.5) * height / puzzle.m, str(slot + 1),
                  color="yellow", ha="center", va="center", fontsize=9, alpha=0.8)
    right.text(0.0, 1.0, _question_excerpt(puzzle) + "\n\n" + _answer_text(puzzle),
               va="top", ha="left", family="monospace", fontsize=7.5, transform=right.transAxes)
    for ax in (left, middle, right):
      ax.set_xticks([])
      ax.set_yticks([])
    right.axis("off")
  fig.suptitle("Puzzle slots are numbered (yellow) on this preview only", fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.99))
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=90)
  plt.close(fig)
  return output


def _load_images(source_kind: str, count: int, image_size: int, seed: int) -> list[np.ndarray]:
  from jigsaw_jax import data
  config = data.source_config()
  config.kind, config.split, config.seed = source_kind, "test", seed
  config.image_size = (image_size, image_size)
  source = data.make_image_source(config)
  return [source[i] for i in range(count)]


def run_from_config(config, workdir: str) -> str:
  """The `preview` task of `jigsaw_jax.main`."""
  p = config.preview
  images = _load_images(p.source, 8, p.image_size, config.seed)
  output = render_gallery(images, list(p.sizes), list(p.question_types),
                          os.path.join(workdir, "preview.png"), think=p.think, seed=config.seed)
  print(f"Wrote {output}")
  return output


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default="preview.png")
  parser.add_argument("--sizes", default="2x1,1x2,3x1,2x2,3x3")
  parser.add_argument("--question-types", default="full,pair")
  parser.add_argument("--think", action="store_true")
  parser.add_argument("--source", default="bundled", choices=["bundled", "procedural"])
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  images = _load_images(args.source, 8, args.image_size, args.seed)
  out = render_gallery(images, args.sizes.split(","), args.question_types.split(","),
                       args.output, think=args.think, seed=args.seed)
  print(f"Wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
