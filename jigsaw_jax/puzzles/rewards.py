"""Answer parsing and rule-based rewards, reproducing Jigsaw-R1's `utils/reward.py` to the letter.

The reference's behaviour is kept exactly, quirks included, because the paper's numbers and any
comparison with its released checkpoints depend on it:

* Thinking answers are read from the FIRST `<answer>…</answer>` block; without one, from the whole
  stripped output. Non-thinking answers are the whole stripped output.
* Letters: the LAST ASCII capital letter of the answer; accuracy compares case-insensitively.
  With no ASCII capital at all, the "extracted answer" is the answer text reversed, so a lone
  lowercase "b" is still correct for "B" (and a lone "É" passes the thinking format check).
* Grids: backticks, commas, semicolons and newlines become spaces, runs of two or more whitespace
  characters collapse to one space, and the string is split on single spaces; every token must be
  ASCII digits with a value in [1, m*n], else the answer is unparseable. A single tab between two
  numbers therefore makes the answer unparseable. No check that the answer is a permutation.
* Thinking format: the whole completion must match `<think>.*?</think>\\s*<answer>.*?</answer>`
  (the first, lazy match must span the entire string), then the answer must type-check.
* Non-thinking letter format: the raw completion must be exactly one uppercase character.
* Accuracy: fractional for grids (matching positions / m*n), 0/1 for letters; `correct` is the
  exact-match flag that the paper's tables report. Total = 1.0*accuracy + 0.5*format.

`score_connections` (the fraction of correctly adjacent internal edges) is the reference's
optional grid reward, off by default as in the paper. Two variants sit behind flags, both off by
default: `binary_grid` (accuracy 1 only for the exact permutation, the paper's Table 9 ablation)
and `require_permutation` (an answer that repeats an index scores no accuracy). Without either,
a grid like "2 2" for a 2x1 puzzle earns a certain 0.5 accuracy + 1.0 format, exactly the expected
reward of guessing; a policy that cannot yet see the answer drifts to it (we saw this on the CPU
miniature), which is why the miniature uses `binary_grid`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Union

ACCURACY_WEIGHT = 1.0
FORMAT_WEIGHT = 0.5

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ASCII_CAPITAL = re.compile(r"[A-Z]")
_DIGITS = re.compile(r"[0-9]+")
_WHITESPACE_RUN = re.compile(r"\s{2,}")

Extracted = Union[list, str, None]


def answer_text(output: str, think: bool) -> str:
  """The part of a completion that holds the answer."""
  if think:
    block = _ANSWER_BLOCK.search(output)
    if block:
      return block.group(1).strip()
  return output.strip()


def parse_grid(text: str, m: int, n: int) -> Optional[list[int]]:
  """Grid tokens as ints, or None if any token is not an integer in [1, m*n]."""
  for separator in ("`", ",", ";", "\n"):
    text = text.replace(separator, " ")
  tokens = _WHITESPACE_RUN.sub(" ", text).strip().split(" ")
  values = []
  for token in tokens:
    if not _DIGITS.fullmatch(token):
      return None
    value = int(token)
    if not 1 <= value <= m * n:
      return None
    values.append(value)
  return values


def parse_letter(text: str) -> str:
  """The last ASCII capital letter; with none, the text reversed (the reference's fallback)."""
  reversed_text = text[::-1]
  found = _ASCII_CAPITAL.search(reversed_text)
  return found.group(0) if found else reversed_text


def extract_answer(output: str, answer_type: str, think: bool, m: int = 0, n: int = 0) -> Extracted:
  """The reference's `extract_answer` for the puzzle answer types ("grid" and "letter")."""
  text = answer_text(output, think)
  if answer_type == "grid":
    return parse_grid(text, m, n)
  if answer_type == "letter":
    return parse_letter(text)
  raise ValueError(f"Unknown answer_type {answer_type!r}; expected 'grid' or 'letter'.")


def score_patches(predicted: Optional[Sequence[int]], solution: Sequence[int]) -> float:
  """Fraction of positions whose predicted index equals the solution (0 if the lengths differ)."""
  if predicted is None or len(predicted) != len(solution):
    return 0.0
  return sum(p == s for p, s in zip(predicted, solution)) / len(solution)


def score_connections(predicted: Optional[Sequence[int]], solution: Sequence[int], m: int,
                      n: int) -> float:
  """Fraction of the 2mn-m-n internal edges whose two predicted patches are adjacent in the same
  direction in the solution (forward convention)."""
  if predicted is None or len(predicted) != len(solution):
    return 0.0
  solution_slot = {patch: slot for slot, patch in enumerate(solution)}
  edges = 2 * m * n - m - n
  good = 0
  for i in range(m):
    for j in range(n):
      here = i * n + j
      if j + 1 < n:
        a, b = solution_slot[predicted[here]], solution_slot[predicted[here + 1]]
        good += a // n == b // n and b % n - a % n == 1
      if i + 1 < m:
        a, b = solution_slot[predicted[here]], solution_slot[predicted[here + n]]
        good += a % n == b % n and b // n - a // n == 1
  return good / edges if edges > 0 else 0.0


def format_reward(output: str, answer_type: str, think: bool, m: int = 0, n: int = 0) -> float:
  """1.0 if the completion has the required shape, else 0.0."""
  if think:
    match = _THINK_FORMAT.search(output)
    if not match or match.group(0) != output:
      return 0.0
  elif answer_type == "letter":
    return float(len(output) == 1 and output[0].isupper())
  extracted = extract_answer(output, answer_type, think, m, n)
  if answer_type == "grid":
    return float(isinstance(extracted, list) and len(extracted) == m * n)
  return float(len(extracted) == 1 and extracted[0].isupper())


@dataclasses.dataclass(frozen=True)
class Score:
  accuracy: float  # fractional for grids, 0/1 for letters: the RL accuracy reward
  format: float  # 0/1
  correct: float  # exact match: what the paper's tables report

  @property
  def total(self) -> float:
    return ACCURACY_WEIGHT * self.accuracy + FORMAT_WEIGHT * self.format


def score_completion(completion: str, answer_type: str, solution, think: bool, m: int = 0,
                     n: int = 0, *, use_connections: bool = False,
                     prefill_think: bool = False, binary_grid: bool = False,
                     require_permutation: bool = False) -> Score:
  """Scores one completion against its solution.

  Args:
    completion: the decoded model output (special tokens skipped).
    answer_type: "grid" (full puzzles) or "letter" (pair puzzles).
    solution: the forward permutation (ints) for grids, the letter for letters.
    think: whether the thinking prompt was used.
    m, n: the grid shape the prompt stated (after any swap).
    use_connections: grid accuracy by correct adjacencies instead of positions.
    prefill_think: the prompt ended with "<think>" (base-model template), so the reference puts
      "<think>" back in front of the completion before scoring.
    binary_grid: grid accuracy is the exact-match flag instead of the fraction of positions.
    require_permutation: a grid that is not a permutation of 1..m*n gets accuracy 0.
  """
  output = "<think>" + completion if (think and prefill_think) else completion
  extracted = extract_answer(output, answer_type, think, m, n)
  if answer_type == "grid":
    solution = [int(x) for x in solution]
    if use_connections:
      accuracy = score_connections(extracted, solution, m, n)
    else:
      accuracy = score_patches(extracted, solution)
    correct = float(extracted == solution)
    if require_permutation and (extracted is None or sorted(extracted) != sorted(solution)):
      accuracy = 0.0
    if binary_grid:
      accuracy = correct
  else:
    correct = float(str(extracted).lower() == str(solution).lower())
    accuracy = correct
  return Score(accuracy=accuracy, format=format_reward(output, answer_type, think, m, n),
               correct=correct)
