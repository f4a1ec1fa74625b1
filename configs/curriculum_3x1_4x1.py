"""Curriculum: 3x1 pair puzzles for 1,000 steps, then 4x1 pair puzzles for 1,000 more,
non-thinking (the paper's best non-thinking setting for downstream transfer, Table 3).

This is the reference README's curriculum command (`--m 3 4 --n 1 1 --stage 64000 99999999
--question_type pair --no-think --max_steps 2000`; its --stage counts 64 prompts per step per
process, so 64000 is step 1,000). Stages switch at a global prompt index, so a resumed run stays
in the stage it was in (the reference's per-process counter restarts at 0 on resume).

  python -m jigsaw_jax.main --config=configs/curriculum_3x1_4x1.py --workdir=/ckpt/curriculum \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.source.kind=folder --config.data.source.path=/data/coco/train2014 \
      --config.data.source.test_hf_dataset=/data/jigsaw-r1-coco  # the reference's test set
  python -m jigsaw_jax.main --config=configs/curriculum_3x1_4x1.py:tiny --workdir=/tmp/curriculum
"""

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.data.pipeline.puzzle.m, c.data.pipeline.puzzle.n = 3, 1
  c.data.pipeline.puzzle.question_type = "pair"
  c.data.pipeline.puzzle.think = False
  c.total_steps, switch = 2000, 1000
  c.eval.sizes = ("2x1", "3x1", "4x1", "2x2")
  c.eval.question_types = ("pair",)
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      c.total_steps, switch = 20, 10
      c.rollout.max_new_tokens = c.eval.max_new_tokens = 10
      c.eval.sizes, c.eval.num_puzzles = ("3x1", "4x1"), 20
      c.optim.learning_rate = 1e-4
  c.data.pipeline.curriculum = [{"start_step": switch, "m": 4}]
  configlib.apply_fields(c, fields)
  return c
