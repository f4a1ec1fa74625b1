"""Full 3x3 puzzles on Qwen2.5-VL-3B, non-thinking.

  python -m jigsaw_jax.main --config=configs/jigsaw_3x3.py --workdir=/ckpt/jigsaw_3x3 \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.source.kind=folder --config.data.source.path=/data/coco/train2014 \
      --config.data.source.test_hf_dataset=/data/jigsaw-r1-coco  # the reference's test set
  # Memory plan on 8 devices, without weights:
  python -m jigsaw_jax.tools.plan --config=configs/jigsaw_3x3.py --devices=8 --mesh=1,8,1
  # On a CPU:
  python -m jigsaw_jax.main --config=configs/jigsaw_3x3.py:tiny --workdir=/tmp/jigsaw_3x3
"""

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.data.pipeline.puzzle.m, c.data.pipeline.puzzle.n = 3, 3
  c.data.pipeline.puzzle.question_type = "full"
  c.eval.sizes = ("2x1", "3x1", "2x2", "3x3")
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      c.rollout.max_new_tokens = c.eval.max_new_tokens = 24  # nine indices and separators
      c.total_steps = 20
      c.eval.sizes = ("3x3",)
      c.eval.num_puzzles = 20
      c.optim.learning_rate = 1e-4
  configlib.apply_fields(c, fields)
  return c
