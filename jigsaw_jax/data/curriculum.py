"""Curriculum: which PuzzleSpec the prompt with global index p gets.

Stages switch at global prompt indices, so the spec is a pure function of p and a resumed run
sees exactly the stages an uninterrupted one would. (The reference counts `__getitem__` calls per
process, G copies included: its `--stage 64000` on 8 processes with G=8 and 64 prompts per step is
1,000 steps, i.e. `start_step=1000` or `start_prompt=64000` here.)
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Mapping, Sequence, Tuple, Union

from jigsaw_jax.puzzles import PuzzleSpec

_START_KEYS = ("start_step", "start_prompt")


@dataclasses.dataclass(frozen=True)
class Stage:
  """From global prompt index `start_prompt` on, puzzles follow `spec`."""

  start_prompt: int
  spec: PuzzleSpec


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Stages sorted by start; the first starts at prompt 0."""

  stages: Tuple[Stage, ...]

  def __post_init__(self):
    starts = [s.start_prompt for s in self.stages]
    if not starts or starts[0] != 0:
      raise ValueError(f"The first curriculum stage must start at prompt 0; got starts {starts}.")
    if any(b <= a for a, b in zip(starts, starts[1:])):
      raise ValueError(f"Curriculum stages must start at increasing prompts; got {starts}.")

  def stage_index(self, prompt_index: int) -> int:
    return bisect.bisect_right([s.start_prompt for s in self.stages], prompt_index) - 1

  def spec(self, prompt_index: int) -> PuzzleSpec:
    return self.stages[self.stage_index(prompt_index)].spec

  @classmethod
  def constant(cls, spec: PuzzleSpec) -> "Curriculum":
    return cls((Stage(0, spec),))


def curriculum_from_config(puzzle: Mapping[str, Any],
                           stages: Sequence[Mapping[str, Any]],
                           prompts_per_step: int) -> Curriculum:
  """Builds the curriculum of `config.data.pipeline` (`puzzle` and `curriculum` fields).

  Args:
    puzzle: PuzzleSpec fields of the first stage.
    stages: later stages; each has `start_step` or `start_prompt` and the fields that change
      from the stage before it.
    prompts_per_step: prompts in one global batch, to turn `start_step` into a prompt index.
  """
  spec_fields = {f.name for f in dataclasses.fields(PuzzleSpec)}
  fields = dict(puzzle)
  unknown = sorted(set(fields) - spec_fields)
  if unknown:
    raise ValueError(f"Unknown puzzle fields {unknown}; valid: {sorted(spec_fields)}.")
  result = [Stage(0, PuzzleSpec(**fields))]
  for i, stage in enumerate(stages):
    stage = dict(stage)
    starts = [k for k in _START_KEYS if k in stage]
    if len(starts) != 1:
      raise ValueError(
          f"Curriculum stage {i} ({stage}) needs exactly one of {_START_KEYS}; found {starts}.")
    start = int(stage.pop(starts[0]))
    if starts[0] == "start_step":
      start *= prompts_per_step
    unknown = sorted(set(stage) - spec_fields)
    if unknown:
      raise ValueError(
          f"Curriculum stage {i} has unknown fields {unknown}; valid: {sorted(spec_fields)} and "
          f"one of {_START_KEYS}.")
    fields.update(stage)
    if i == 0 and start == 0:  # A stage at 0 replaces the base spec (a curriculum in full).
      result[0] = Stage(0, PuzzleSpec(**fields))
    elif start <= result[-1].start_prompt:
      raise ValueError(
          f"Curriculum stage {i} starts at prompt {start}, not after the stage before it (prompt "
          f"{result[-1].start_prompt}); list stages in increasing order of start.")
    else:
      result.append(Stage(start, PuzzleSpec(**fields)))
  return Curriculum(tuple(result))


CurriculumLike = Union[Curriculum, PuzzleSpec, Sequence[Tuple[int, PuzzleSpec]]]


def as_curriculum(value: CurriculumLike) -> Curriculum:
  """Accepts a Curriculum, one PuzzleSpec, or a list of (start_prompt, PuzzleSpec)."""
  if isinstance(value, Curriculum):
    return value
  if isinstance(value, PuzzleSpec):
    return Curriculum.constant(value)
  return Curriculum(tuple(Stage(int(start), spec) for start, spec in value))
