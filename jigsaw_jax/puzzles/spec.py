"""What a puzzle is: the knobs that define one (`PuzzleSpec`) and one generated instance (`Puzzle`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import numpy as np

from jigsaw_jax.puzzles.prompts import PROMPT_STYLES

QUESTION_TYPES = ("full", "pair")
ANSWER_TYPE_OF_QUESTION = {"full": "grid", "pair": "letter"}


@dataclasses.dataclass(frozen=True)
class PuzzleSpec:
  """The configuration of a family of puzzles.

  Attributes:
    m: rows of the grid before the optional orientation swap.
    n: columns of the grid before the optional orientation swap.
    question_type: "full" (the whole permutation) or "pair" (relative position of two patches).
    think: thinking prompt (`<think>…</think><answer>…</answer>`) or a direct answer.
    shuffle_mn: with probability 0.5 swap m and n (2x1 becomes 1x2), as the reference does.
    mask_ratio: black out this fraction of each patch's border (0 in the paper).
    instruct_model: chat prompt for instruct models; False wraps the text in the R1-Zero
      "A conversation between User and Assistant" template used for base models.
    prompt_style: "paper" (Jigsaw-R1's wording) or "compact" (the same information in about a
      quarter of the tokens, for policies that read no English; see puzzles/prompts.py).
  """

  m: int = 2
  n: int = 1
  question_type: str = "full"
  think: bool = False
  shuffle_mn: bool = True
  mask_ratio: float = 0.0
  instruct_model: bool = True
  prompt_style: str = "paper"

  def __post_init__(self):
    if self.question_type not in QUESTION_TYPES:
      raise ValueError(
          f"question_type must be one of {QUESTION_TYPES}, got {self.question_type!r}.")
    if self.m < 1 or self.n < 1 or self.m * self.n < 2:
      raise ValueError(
          f"A puzzle needs at least two patches; got a {self.m}x{self.n} grid. "
          "Set m and n to positive integers with m*n >= 2.")
    if self.prompt_style not in PROMPT_STYLES:
      raise ValueError(
          f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}.")
    if not 0.0 <= self.mask_ratio < 0.5:
      raise ValueError(f"mask_ratio must be in [0, 0.5), got {self.mask_ratio}.")

  @property
  def answer_type(self) -> str:
    return ANSWER_TYPE_OF_QUESTION[self.question_type]


Solution = Union[Tuple[int, ...], str]


@dataclasses.dataclass(frozen=True, eq=False)
class Puzzle:
  """One generated puzzle, ready to be prompted and scored.

  `solution` follows the reference's forward convention: for `full`, `solution[x - 1]` is the
  original position of the patch now at position x (1-based, row-major); for `pair` it is the
  letter of the correct choice.
  """

  image: np.ndarray  # uint8 [H, W, 3], the shuffled composite
  original: np.ndarray  # uint8 [H, W, 3], the source cropped so that the grid divides it
  m: int  # rows after the optional swap
  n: int  # columns after the optional swap
  question_type: str
  think: bool
  permutation: Tuple[int, ...]  # patches_forward: original 1-based position of the patch at each slot
  solution: Solution
  prompt: str  # the user turn's text
  num_choices: Optional[int] = None
  pair: Optional[Tuple[int, int]] = None
  choices: Optional[Tuple[str, ...]] = None
  instruct_model: bool = True
  source_index: Optional[int] = None  # which image of its source it was cut from (eval records)

  @property
  def answer_type(self) -> str:
    return ANSWER_TYPE_OF_QUESTION[self.question_type]

  @property
  def size(self) -> str:
    return f"{self.m}x{self.n}"

  def messages(self) -> list[dict[str, Any]]:
    """The conversation as the reference builds it: one user turn holding [image, text]."""
    return [{
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": self.prompt}],
    }]

  def to_record(self) -> dict[str, Any]:
    """The JSON-able fields that the score CLI reads back (no pixels)."""
    return {
        "question_type": self.question_type,
        "m": self.m,
        "n": self.n,
        "think": self.think,
        "solution": list(self.solution) if self.question_type == "full" else self.solution,
        "num_choices": self.num_choices,
        "pair": list(self.pair) if self.pair else None,
        "prompt": self.prompt,
    }
