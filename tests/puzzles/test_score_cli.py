"""The score CLI rescoring saved completions, and what it does with malformed lines."""

import json
import subprocess
import sys

from jigsaw_jax.puzzles import score


def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_cli_adds_scores_and_keeps_the_input_fields(tmp_path):
  records = [
      {"id": "a", "question_type": "full", "m": 2, "n": 1, "think": False, "solution": [2, 1],
       "completion": "2\n1"},
      {"id": "b", "question_type": "full", "m": 1, "n": 3, "think": True, "solution": [3, 1, 2],
       "completion": "<think>...</think><answer>3 2 1</answer>"},
      {"id": "c", "question_type": "pair", "m": 2, "n": 2, "think": False, "solution": "C",
       "num_choices": 8, "completion": "(C)"},
  ]
  _write(tmp_path / "in.jsonl", records)
  done = subprocess.run(
      [sys.executable, "-m", "jigsaw_jax.puzzles.score", "--input", str(tmp_path / "in.jsonl"),
       "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [o["id"] for o in out] == ["a", "b", "c"]
  assert [(o["accuracy"], o["format"], o["correct"]) for o in out] == [
      (1.0, 1.0, 1.0), (1 / 3, 1.0, 0.0), (1.0, 0.0, 1.0)]
  for o, r in zip(out, records):
    assert {k: o[k] for k in r} == r


def test_malformed_lines_are_reported_and_written_back(tmp_path):
  good = {"id": 1, "question_type": "pair", "m": 2, "n": 1, "think": False, "solution": "A",
          "completion": "A"}
  bad_type = {**good, "id": 2, "question_type": "multiple"}
  bad_solution = {**good, "id": 3, "question_type": "full", "solution": [1]}
  _write(tmp_path / "in.jsonl", [good, "{not json", bad_type, bad_solution])
  code = score.main(["--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl")])
  assert code == 1
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(out) == 4  # nothing is lost
  assert out[0]["correct"] == 1.0 and "error" not in out[0]
  assert out[1]["line"] == 2 and "not valid JSON" in out[1]["error"]
  assert "question_type must be one of" in out[2]["error"]
  assert "list of 2 integers" in out[3]["error"]
