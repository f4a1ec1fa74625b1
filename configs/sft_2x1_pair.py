"""SFT baseline on 2x1 pair puzzles (paper Table 6): non-thinking on ground-truth answers;
`:think` trains on the policy's own correct thinking completions (rejection sampling).

  python -m jigsaw_jax.main --config=configs/sft_2x1_pair.py --workdir=/ckpt/sft_pair \
      --config.model.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.source.kind=folder --config.data.source.path=/data/coco/train2014 \
      --config.data.source.test_hf_dataset=/data/jigsaw-r1-coco  # the reference's test set
  # SFT -> RL cold start: GRPO from the SFT run's last checkpoint.
  python -m jigsaw_jax.main --config=configs/jigsaw_2x1_pair.py --workdir=/ckpt/sft_then_rl \
      --config.init_from=/ckpt/sft_pair
  python -m jigsaw_jax.main --config=configs/sft_2x1_pair.py:tiny --workdir=/tmp/sft_pair
"""

from jigsaw_jax import base_config, configlib


def get_config(arg=None):
  words, fields = configlib.parse_arg(arg)
  c = base_config.base_config()
  c.task = "sft"
  c.total_steps = 1000
  c.data.pipeline.puzzle.m, c.data.pipeline.puzzle.n = 2, 1
  c.data.pipeline.puzzle.question_type = "pair"
  c.eval.question_types = ("pair",)
  c.eval.sizes = ("2x1", "1x2", "3x1", "4x1", "2x2")
  if "think" in words:
    c.data.pipeline.puzzle.think = True
    c.eval.thinks = (True,)
    c.sft.mode = "rejection_sampling"
    c.sft.target_length = 512
  for preset in ("tiny", "small"):
    if preset in words:
      base_config.apply_cpu_preset(c, preset)
      c.total_steps = 20
      c.eval.sizes, c.eval.num_puzzles = ("2x1",), 20
      c.optim.learning_rate = 1e-3
  configlib.apply_fields(c, fields)
  return c
