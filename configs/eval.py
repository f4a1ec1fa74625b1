"""Evaluate a finished run (Orbax restore of its latest checkpoint, or `restore.step`) on every
puzzle size, writing eval.json / eval.md / eval.png and a gallery into --workdir.

  python -m jigsaw_jax.main --config=configs/eval.py --workdir=/ckpt/pair_2x1/eval \
      --config.restore.workdir=/ckpt/pair_2x1 \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.eval.question_types='("pair",)'
  # The base model itself (no checkpoint):
  python -m jigsaw_jax.main --config=configs/eval.py --workdir=/ckpt/base_eval \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct --config.restore.from_checkpoint=False
  python -m jigsaw_jax.main --config=configs/eval.py:tiny --workdir=/tmp/jigsaw/eval \
      --config.restore.workdir=/tmp/jigsaw
"""

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.task = "eval"
  c.eval.sizes = ("2x1", "1x2", "3x1", "4x1", "2x2", "3x3")
  c.eval.question_types = ("full", "pair")
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      base_config.apply_miniature(c)
  configlib.apply_fields(c, fields)
  return c
