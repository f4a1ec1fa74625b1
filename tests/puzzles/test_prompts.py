"""Prompt snapshots for each (question type, thinking, orientation), checked word for word.

The snapshot files were reviewed against the reference's prompt builder; regenerate them only
on purpose with `UPDATE_SNAPSHOTS=1 pytest tests/puzzles/test_prompts.py` and review the diff.
"""

import os
import pathlib

import numpy as np
import pytest

from jigsaw_jax.puzzles import PuzzleSpec, make_puzzle, puzzle_rng
from jigsaw_jax.puzzles.prompts import puzzle_prompt

SNAPSHOTS = pathlib.Path(__file__).parent / "snapshots"
CASES = [(q, think, m, n) for q in ("full", "pair") for think in (False, True)
         for (m, n) in ((2, 1), (1, 2), (2, 2))]


def _prompt(question_type, think, m, n, instruct_model=True):
  pair, choices = None, ()
  if question_type == "pair":
    # A fixed question so the snapshot does not depend on the RNG.
    pair = (2, 1)
    relations = {(2, 1): ("is directly above", "is directly below"),
                 (1, 2): ("is directly to the left of", "is directly to the right of")}.get(
                     (m, n), ("is on the upper left of", "is directly below",
                              "is directly to the left of", "is on the lower right of",
                              "is directly above", "is on the upper right of",
                              "is directly to the right of", "is on the lower left of"))
    choices = tuple(f"2 {r} 1" for r in relations)
  return puzzle_prompt(m, n, question_type, think, pair=pair, choices=choices,
                       instruct_model=instruct_model)


@pytest.mark.parametrize("question_type,think,m,n", CASES)
def test_prompt_snapshot(question_type, think, m, n):
  name = f"{question_type}_{'think' if think else 'nothink'}_{m}x{n}.txt"
  text = _prompt(question_type, think, m, n)
  path = SNAPSHOTS / name
  if os.environ.get("UPDATE_SNAPSHOTS"):
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
  assert text == path.read_text()


def test_base_model_template_snapshot():
  text = _prompt("full", True, 2, 1, instruct_model=False)
  path = SNAPSHOTS / "full_think_2x1_base_model.txt"
  if os.environ.get("UPDATE_SNAPSHOTS"):
    path.write_text(text)
  assert text == path.read_text()
  assert text.endswith("Assistant: <think>")


def test_generated_pair_prompt_lists_its_choices_in_letter_order():
  image = np.zeros((12, 12, 3), np.uint8)
  puzzle = make_puzzle(image, PuzzleSpec(m=2, n=2, question_type="pair", think=True),
                       puzzle_rng(0, 5))
  k, l = puzzle.pair
  assert f"For patches currently at positions {k} and {l}," in puzzle.prompt
  assert "from the following 8 choices:" in puzzle.prompt
  for letter, choice in zip("ABCDEFGH", puzzle.choices):
    assert f"({letter}) {choice}\n" in puzzle.prompt
  assert puzzle.messages() == [{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": puzzle.prompt}]}]


@pytest.mark.parametrize("question_type", ["full", "pair"])
def test_compact_prompt_keeps_what_a_puzzle_needs_in_a_fraction_of_the_text(question_type):
  image = np.zeros((12, 12, 3), np.uint8)
  paper, compact = (make_puzzle(image, PuzzleSpec(m=2, n=2, question_type=question_type,
                                                  prompt_style=style), puzzle_rng(0, 5))
                    for style in ("paper", "compact"))
  # Same puzzle, same answer: only the wording differs.
  assert compact.solution == paper.solution and compact.choices == paper.choices
  text = compact.prompt
  assert len(text) < len(paper.prompt) / 2  # the 2x2 pair choices themselves are long
  assert text.startswith("2x2 jigsaw, positions 1 (top-left) to 4 (bottom-right).")
  if question_type == "full":
    assert text.endswith("as a 2x2 grid?")
  else:
    k, l = compact.pair
    assert f"Patches {k} and {l}:" in text
    for letter, choice in zip("ABCDEFGH", compact.choices):
      assert f"({letter}) {choice}" in text


def test_compact_prompt_thinking_masking_and_base_model_template():
  text = puzzle_prompt(2, 1, "full", True, mask_ratio=0.1, instruct_model=False, style="compact")
  assert "Borders masked." in text
  assert "Think in <think> </think>, answer in <answer> </answer>." in text
  assert text.endswith("Assistant: <think>")


def test_unknown_prompt_style_is_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match=r"prompt_style must be one of \('paper', 'compact'\)"):
    PuzzleSpec(prompt_style="short")
