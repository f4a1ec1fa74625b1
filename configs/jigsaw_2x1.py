"""Full 2x1 puzzles (with the 1x2 swap), non-thinking: the paper's Table 7 setting.

  # The paper's run (Qwen2.5-VL-3B, COCO), on a pod:
  python -m jigsaw_jax.main --config=configs/jigsaw_2x1.py --workdir=/ckpt/jigsaw_2x1 \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.source.kind=folder --config.data.source.path=/data/coco/train2014 \
      --config.data.source.test_hf_dataset=/data/jigsaw-r1-coco  # the reference's test set
  # The CPU miniature (the README's main command): format pretraining, then GRPO, eval before/after.
  python -m jigsaw_jax.main --config=configs/jigsaw_2x1.py:tiny --workdir=/tmp/jigsaw
"""

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.data.pipeline.puzzle.m, c.data.pipeline.puzzle.n = 2, 1
  c.data.pipeline.puzzle.question_type = "full"
  c.data.pipeline.puzzle.think = False
  c.eval.sizes = ("2x1", "1x2", "3x1", "4x1", "2x2", "3x3")
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      base_config.apply_miniature(c)
  configlib.apply_fields(c, fields)
  return c
