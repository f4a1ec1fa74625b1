"""Experiment configs that restate a reference command say what that command does."""

from configs import curriculum_3x1_4x1
from jigsaw_jax.data.curriculum import curriculum_from_config


def test_curriculum_config_is_the_reference_readme_command():
  # Jigsaw-R1 README: --m 3 4 --n 1 1 --stage 64000 99999999 --question_type pair --no-think
  # --max_steps 2000, 64 prompts per step.
  c = curriculum_3x1_4x1.get_config()
  p = c.data.pipeline
  assert c.total_steps == 2000 and p.prompts_per_batch == 64 and p.group_size == 8
  curriculum = curriculum_from_config(p.puzzle, p.curriculum, p.prompts_per_batch)
  first, second = curriculum.spec(64 * 1000 - 1), curriculum.spec(64 * 1000)
  assert (first.m, first.n, second.m, second.n) == (3, 1, 4, 1)
  for spec in (first, second):
    assert spec.question_type == "pair" and not spec.think and spec.shuffle_mn
  assert curriculum.spec(64 * 2000 - 1) == second
  assert tuple(c.eval.question_types) == ("pair",)
