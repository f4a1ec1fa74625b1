"""Prompt text, following Jigsaw-R1's wording (paper Appendix I) so that trained policies see the
exact prompts of the paper.

The user turn's text has four parts: the task statement, the index grid, the question, and the
instruction suffix (thinking or non-thinking, then a format sentence).

`style="compact"` says the same things in about a quarter of the tokens (size, index direction,
question, choices, answer format). It is for policies that read no English, such as the CPU
miniature's from-scratch model, to which the paper's wording (131 tokens of its tokenizer for a
2x1 full question, against 35) is a constant prefix that costs most of each training step.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

_THINK_INSTRUCTION = (
    "First, output the thinking process within <think> </think> tags. "
    "Then, provide the final answer within <answer> </answer> tags. ")
_DIRECT_INSTRUCTION = "Directly output the final answer. "
_FORMAT_SENTENCE = {
    "grid": "The final answer should be the position indexes arranged in a {m}x{n} grid.",
    "letter": "The final answer should be a single letter.",
    "digit": "The final answer should be a single number.",
}
# Base (non-instruct) models get the R1-Zero template; the completion starts inside <think>.
_BASE_MODEL_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question about the image, "
    "and the Assistant solves it.\n\nUser: ")


def index_grid(m: int, n: int, values: Optional[Sequence[int]] = None) -> str:
  """An m x n grid of numbers, one row per line, separated by single spaces."""
  values = list(values) if values is not None else list(range(1, m * n + 1))
  return "\n".join(" ".join(str(values[i * n + j]) for j in range(n)) for i in range(m))


def _direction_words(m: int, n: int) -> tuple[str, str]:
  if m == 1:
    return "left", "right"
  if n == 1:
    return "top", "bottom"
  return "top-left", "bottom-right"


def task_statement(m: int, n: int, mask_ratio: float = 0.0) -> str:
  first, last = _direction_words(m, n)
  mask_info = (" To increase the task difficulty, the borders of each patch have been masked out."
               if mask_ratio > 0 else "")
  return (
      f"The input image is divided into {m}x{n} patches that have been randomly permuted from "
      f"their original positions. Your task is to solve this {m}x{n} jigsaw puzzle and "
      f"reconstruct the original image.{mask_info}\n\n"
      f"Consider a {m}x{n} grid, where each number represents a position index ranging from "
      f"1 ({first}) to {m * n} ({last}):\n\n```\n{index_grid(m, n)}\n```\n\n")


def full_question() -> str:
  return ("For each patch, determine its correct position index in the original image. If a "
          "patch currently at position X should belong at position Y, place \"Y\" at position X.")


def _lettered(choices: Sequence[str], separator: str) -> str:
  return separator.join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))


def _paper_choices(question: str, choices: Sequence[str]) -> str:
  lines = _lettered(choices, "\n")
  return (f"{question}\n\nSelect the correct answer from the following {len(choices)} "
          f"choices:\n\n{lines}")


def pair_question(k: int, l: int, choices: Sequence[str]) -> str:
  return _paper_choices(f"For patches currently at positions {k} and {l}, determine their "
                        "relative position in the original image.", choices)


def with_instruction(question: str, answer_type: str, m: int, n: int, think: bool,
                     instruct_model: bool = True) -> str:
  """Appends the thinking / direct instruction and the format sentence."""
  suffix = (_THINK_INSTRUCTION if think else _DIRECT_INSTRUCTION) + _FORMAT_SENTENCE[
      answer_type].format(m=m, n=n)
  return _for_model(f"{question}\n\n{suffix}", think, instruct_model)


def _for_model(text: str, think: bool, instruct_model: bool) -> str:
  """Instruct models get the text as is; base models the R1-Zero template around it."""
  if instruct_model:
    return text
  text = f"{_BASE_MODEL_PREAMBLE}{text}\n\nAssistant: "
  return text + "<think>" if think else text


PROMPT_STYLES = ("paper", "compact")


def compact_question(m: int, n: int, question_type: str, think: bool,
                     pair: Optional[tuple[int, int]], choices: Sequence[str],
                     mask_ratio: float = 0.0) -> str:
  """The `compact` style: the paper prompt's information, none of its prose."""
  first, last = _direction_words(m, n)
  masked = " Borders masked." if mask_ratio > 0 else ""
  head = f"{m}x{n} jigsaw, positions 1 ({first}) to {m * n} ({last}).{masked}"
  if question_type == "full":
    body = f"Original position of each patch, as a {m}x{n} grid?"
  else:
    body = f"Patches {pair[0]} and {pair[1]}: {_lettered(choices, ' ')} Letter?"
  tail = " Think in <think> </think>, answer in <answer> </answer>." if think else ""
  return f"{head} {body}{tail}"


def multiple_choice(question: str, choices: Sequence[str], style: str = "paper") -> str:
  """A non-puzzle question with lettered choices, answered directly with one letter, in either
  prompt style (the CPU miniature's pretraining pretexts)."""
  if style == "compact":
    return f"{question} {_lettered(choices, ' ')} Letter?"
  return with_instruction(_paper_choices(question, choices), "letter", 1, 1, think=False)


def puzzle_prompt(m: int, n: int, question_type: str, think: bool, *, mask_ratio: float = 0.0,
                  pair: Optional[tuple[int, int]] = None, choices: Sequence[str] = (),
                  instruct_model: bool = True, style: str = "paper") -> str:
  """The full user-turn text of a puzzle."""
  if question_type not in ("full", "pair"):
    raise ValueError(f"Unknown question_type {question_type!r}; expected 'full' or 'pair'.")
  if question_type == "pair" and pair is None:
    raise ValueError("A pair question needs the two positions `pair=(k, l)`.")
  if style not in PROMPT_STYLES:
    raise ValueError(f"Unknown prompt style {style!r}; expected one of {PROMPT_STYLES}.")
  if style == "compact":
    return _for_model(compact_question(m, n, question_type, think, pair, choices, mask_ratio),
                      think, instruct_model)
  if question_type == "full":
    question, answer_type = full_question(), "grid"
  else:
    question, answer_type = pair_question(pair[0], pair[1], choices), "letter"
  return with_instruction(task_statement(m, n, mask_ratio) + question, answer_type, m, n, think,
                          instruct_model)
