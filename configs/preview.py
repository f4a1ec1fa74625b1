"""Preview puzzles before any model exists: writes `<workdir>/preview.png`.

  python -m jigsaw_jax.main --config=configs/preview.py --workdir=/tmp/jigsaw_preview
  python -m jigsaw_jax.main --config=configs/preview.py:think --workdir=/tmp/jigsaw_preview \
      --config.preview.sizes='("3x3", "4x1")'
"""

import ml_collections

from jigsaw_jax import configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.task = "preview"
  config.seed = 0
  config.preview = ml_collections.ConfigDict()
  config.preview.source = "bundled"  # bundled | procedural
  config.preview.image_size = 224
  config.preview.sizes = ("2x1", "1x2", "3x1", "2x2", "3x3")
  config.preview.question_types = ("full", "pair")
  config.preview.think = "think" in words
  configlib.apply_fields(config, fields)
  return config
