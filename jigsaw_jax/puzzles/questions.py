"""Pair questions: the relative position of two patches in the original image.

The relation between the patches now at positions k and l is read off the rows and columns of
their *original* cells, with the reference's definitions: "directly to the left of" means the
same row and a smaller column (not necessarily adjacent), "on the upper left of" means a smaller
row and a smaller column, and so on.
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np

# The eight relations in the reference's order; 1-row grids use the first two, 1-column grids the
# next two.
_RELATIONS = (
    "is directly to the left of",
    "is directly to the right of",
    "is directly above",
    "is directly below",
    "is on the upper left of",
    "is on the upper right of",
    "is on the lower left of",
    "is on the lower right of",
)


def relation_choices(m: int, n: int) -> tuple[str, ...]:
  """The relations offered for an m x n grid: 2 for one row or one column, 8 otherwise."""
  if m == 1:
    return _RELATIONS[:2]
  if n == 1:
    return _RELATIONS[2:4]
  return _RELATIONS


def num_pair_choices(m: int, n: int) -> int:
  return len(relation_choices(m, n))


def true_relation(n: int, k_original: int, l_original: int) -> str:
  """The relation of cell k_original to cell l_original (1-based, row-major, n columns)."""
  k_row, k_col = divmod(k_original - 1, n)
  l_row, l_col = divmod(l_original - 1, n)
  vertical = (k_row > l_row) - (k_row < l_row)  # -1 above, 0 same row, +1 below
  horizontal = (k_col > l_col) - (k_col < l_col)  # -1 left, 0 same column, +1 right
  table = {
      (0, -1): _RELATIONS[0], (0, 1): _RELATIONS[1],
      (-1, 0): _RELATIONS[2], (1, 0): _RELATIONS[3],
      (-1, -1): _RELATIONS[4], (-1, 1): _RELATIONS[5],
      (1, -1): _RELATIONS[6], (1, 1): _RELATIONS[7],
  }
  if (vertical, horizontal) not in table:
    raise ValueError(f"Cells {k_original} and {l_original} coincide; a pair needs two cells.")
  return table[(vertical, horizontal)]


def make_pair_question(m: int, n: int, forward: Sequence[int], rng: np.random.Generator):
  """Draws two distinct current positions and a lettered list of relation choices.

  The choices are shuffled and then the correct one is swapped into a uniformly drawn slot, so
  the answer letter is uniform whatever the shuffle did (as the reference does).

  Returns:
    (k, l, choices, answer_letter) where choices are the texts in letter order ("k <relation> l").
  """
  options = list(relation_choices(m, n))
  answer_slot = int(rng.integers(len(options)))
  k, l = (int(x) + 1 for x in rng.choice(m * n, size=2, replace=False))
  truth = true_relation(n, forward[k - 1], forward[l - 1])
  options = [options[i] for i in rng.permutation(len(options))]
  at = options.index(truth)
  options[at], options[answer_slot] = options[answer_slot], options[at]
  choices = tuple(f"{k} {relation} {l}" for relation in options)
  return k, l, choices, string.ascii_uppercase[answer_slot]
