"""Rescore saved completions with the Jigsaw-R1 rules.

  python -m jigsaw_jax.puzzles.score --input completions.jsonl --output scored.jsonl

Each input line is a JSON object with `id`, `question_type` ("full" | "pair"), `m`, `n`, `think`
(bool), `solution` (list of 1-based ints for full, a letter for pair), `num_choices` (pair) and
`completion` (raw model text). Each output line repeats the input and adds `accuracy`, `format`
and `correct`. A malformed line is never dropped: it is written back with an `error` field that
says what was expected, and the command exits with status 1 after scoring every other line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jigsaw_jax.puzzles.rewards import score_completion
from jigsaw_jax.puzzles.spec import ANSWER_TYPE_OF_QUESTION

_REQUIRED = ("question_type", "m", "n", "think", "solution", "completion")


def _validate(record: Any) -> None:
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  missing = [k for k in _REQUIRED if k not in record]
  if missing:
    raise ValueError(f"missing field(s) {missing}; each line needs {list(_REQUIRED)}")
  if record["question_type"] not in ANSWER_TYPE_OF_QUESTION:
    raise ValueError(
        f"question_type must be one of {list(ANSWER_TYPE_OF_QUESTION)}, got "
        f"{record['question_type']!r}")
  for key in ("m", "n"):
    if isinstance(record[key], bool) or not isinstance(record[key], int) or record[key] < 1:
      raise ValueError(f"{key} must be a positive integer, got {record[key]!r}")
  if not isinstance(record["think"], bool):
    raise ValueError(f"think must be true or false, got {record['think']!r}")
  if not isinstance(record["completion"], str):
    raise ValueError(f"completion must be a string, got {type(record['completion']).__name__}")
  solution = record["solution"]
  if record["question_type"] == "full":
    size = record["m"] * record["n"]
    if (not isinstance(solution, list) or len(solution) != size
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in solution)):
      raise ValueError(
          f"a full {record['m']}x{record['n']} solution must be a list of {size} integers, "
          f"got {solution!r}")
  elif not (isinstance(solution, str) and len(solution) == 1):
    raise ValueError(f"a pair solution must be one letter such as \"B\", got {solution!r}")


def score_record(record: dict, prefill_think: bool = False) -> dict:
  """The input record with `accuracy`, `format` and `correct` added."""
  _validate(record)
  score = score_completion(
      record["completion"], ANSWER_TYPE_OF_QUESTION[record["question_type"]], record["solution"],
      record["think"], record["m"], record["n"], prefill_think=prefill_think)
  return {**record, "accuracy": score.accuracy, "format": score.format, "correct": score.correct}


def score_lines(lines, prefill_think: bool = False):
  """Yields (output_record, error_or_None) for each non-blank input line."""
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      yield {"line": number, "raw": line.rstrip("\n"), "error": f"not valid JSON: {e}"}, number
      continue
    try:
      yield score_record(record, prefill_think), None
    except ValueError as e:
      base = record if isinstance(record, dict) else {"raw": record}
      yield {**base, "line": number, "error": str(e)}, number


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="JSONL of completions to score.")
  parser.add_argument("--output", required=True, help="Where to write the scored JSONL.")
  parser.add_argument(
      "--prefill-think", action="store_true",
      help="Completions came from the base-model template, whose prompt ends with <think>; "
      "score them with <think> put back in front, as the reference does for plain strings.")
  args = parser.parse_args(argv)
  bad, count = [], 0
  with open(args.input, encoding="utf-8") as src, open(args.output, "w", encoding="utf-8") as dst:
    for out, error_line in score_lines(src, args.prefill_think):
      dst.write(json.dumps(out, ensure_ascii=False) + "\n")
      count += 1
      if error_line is not None:
        bad.append(error_line)
  if bad:
    print(f"Scored {count - len(bad)} of {count} lines; {len(bad)} malformed line(s) "
          f"{bad[:20]} were written back with an 'error' field.", file=sys.stderr)
    return 1
  print(f"Scored {count} lines into {args.output}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
