"""Export a finished run (its latest checkpoint, or `restore.step`) as a Hugging Face model
directory in --workdir: config.json, safetensors, generation_config.json, tokenizer, chat template
and image processor settings. The model, adapter and image settings come from the run's
config.json; LoRA adapters are merged into the weights.

  python -m jigsaw_jax.main --config=configs/export.py --config.restore.workdir=/tmp/jigsaw \
      --workdir=/tmp/jigsaw_hf
  # A release in bfloat16, at most 2 GB per shard:
  python -m jigsaw_jax.main --config=configs/export.py --config.restore.workdir=/ckpt/jigsaw_2x1 \
      --workdir=/ckpt/jigsaw_2x1_hf --config.export.dtype=bfloat16 \
      --config.export.max_shard_bytes=2000000000
"""

import ml_collections

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.task = "export"
  c.export = ml_collections.ConfigDict(dict(
      dtype="",  # tensor dtype on disk ("bfloat16", "float32"); empty: the params' own
      max_shard_bytes=5 * 2**30,  # transformers' default shard size
  ))
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      base_config.apply_miniature(c)
  configlib.apply_fields(c, fields)
  return c
