"""Named model shapes: the released Qwen-VL checkpoints and CPU-sized models.

    cfg = presets.get_preset("qwen2_5_vl_3b", dtype="bfloat16")
    presets.count_params("qwen2_5_vl_3b")  # 3_754_622_976, without allocating anything

The released shapes are those of the checkpoints' config.json (Qwen/Qwen2.5-VL-3B-Instruct,
Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen2-VL-2B-Instruct); `hf_io.model_config_from_hf` on those
files gives exactly these configs (tested).

The Qwen3-VL presets are the dense Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json values
(text_config, vision_config; the 2B one as of revision 89644892e4d8):
  2B: hidden 2048, intermediate 6144, 28 layers, 16 heads, 8 KV heads, tied embeddings; vision
      depth 24, width 1024, MLP 4096, out 2048, DeepStack after blocks 5, 11, 17.
  4B: hidden 2560, intermediate 9728, 36 layers, 32 heads, 8 KV heads, tied; the 2B's vision
      tower with out 2560.
  8B: hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 KV heads, untied; vision depth 27,
      width 1152, MLP 4304, out 4096, DeepStack after 8, 16, 24.
  All: head_dim 128, rope_theta 5e6, interleaved mrope_section (24, 20, 20), vocab 151936; vision
      patch 16, 16 heads, 2304 learned positions, gelu_pytorch_tanh.
Their parameter counts (2,127,532,032 / 4,437,815,808 / 8,767,123,696) are the published sizes
(tests/models/test_qwen3_vl.py).

`tiny` and `small` keep Qwen2.5-VL's structure (window attention with full-attention blocks,
M-RoPE, tied embeddings) at CPU scale, `qwen3_vl_tiny` Qwen3-VL's, with the vocabulary and
special-token ids of the tokenizer shipped in `assets/tokenizer_tiny`. The InternVL shapes
(`internvl3_2b`, `internvl_tiny`) live in `internvl/presets.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Union

import jax

from jigsaw_jax.models.config import ModelConfig, TextConfig, VisionConfig
from jigsaw_jax.models.internvl import presets as internvl_presets

# The tiny tokenizer's vocabulary size and ids of <|image_pad|>, <|video_pad|>, <|vision_start|>,
# <|vision_end|> (checked against the tokenizer in tests/models/test_presets.py).
_TINY_VOCAB = 1024
_TINY_IDS = dict(image_token_id=1014, video_token_id=1015, vision_start_token_id=1011,
                 vision_end_token_id=1012)


def qwen2_5_vl_3b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                      num_heads=16, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=True),
      vision=VisionConfig(kind="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420,
                          num_heads=16, out_hidden_size=2048, window_size=112,
                          fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu"))


def qwen2_5_vl_7b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                      num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=False),
      vision=VisionConfig(kind="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420,
                          num_heads=16, out_hidden_size=3584, window_size=112,
                          fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu"))


def qwen2_vl_2b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                      num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=True),
      # Qwen2-VL's tower: LayerNorm + quick-GELU MLP (embed_dim 1280, mlp_ratio 4), full attention.
      vision=VisionConfig(kind="qwen2_vl", depth=32, hidden_size=1280, intermediate_size=5120,
                          num_heads=16, out_hidden_size=1536, fullatt_block_indexes=(),
                          hidden_act="quick_gelu"))


def _qwen3_vl(hidden, intermediate, layers, heads, tie, vision_depth, vision_hidden,
              vision_intermediate, deepstack) -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                      num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128,
                      rms_norm_eps=1e-6, rope_theta=5e6, mrope_section=(24, 20, 20),
                      qkv_bias=False, qk_norm=True, mrope_interleaved=True,
                      tie_word_embeddings=tie),
      vision=VisionConfig(kind="qwen3_vl", depth=vision_depth, hidden_size=vision_hidden,
                          intermediate_size=vision_intermediate, num_heads=16, patch_size=16,
                          out_hidden_size=hidden, window_size=0, fullatt_block_indexes=(),
                          hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                          deepstack_visual_indexes=deepstack))


def qwen3_vl_2b() -> ModelConfig:
  return _qwen3_vl(2048, 6144, 28, 16, True, 24, 1024, 4096, (5, 11, 17))


def qwen3_vl_4b() -> ModelConfig:
  return _qwen3_vl(2560, 9728, 36, 32, True, 24, 1024, 4096, (5, 11, 17))


def qwen3_vl_8b() -> ModelConfig:
  return _qwen3_vl(4096, 12288, 36, 32, False, 27, 1152, 4304, (8, 16, 24))


def qwen3_vl_tiny() -> ModelConfig:
  """Qwen3-VL's structure (QK-norm, interleaved M-RoPE, learned vision positions, DeepStack into
  the first two decoder layers) at `tiny`'s CPU scale, with the shipped tokenizer's ids."""
  return ModelConfig(
      text=TextConfig(vocab_size=_TINY_VOCAB, hidden_size=128, intermediate_size=384, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                      rope_theta=5e6, mrope_section=(6, 5, 5), qkv_bias=False, qk_norm=True,
                      mrope_interleaved=True, tie_word_embeddings=True),
      vision=VisionConfig(kind="qwen3_vl", depth=3, hidden_size=64, intermediate_size=128,
                          num_heads=2, patch_size=16, out_hidden_size=128, window_size=0,
                          fullatt_block_indexes=(), hidden_act="gelu_pytorch_tanh",
                          num_position_embeddings=64, deepstack_visual_indexes=(0, 1)),
      **_TINY_IDS)


def tiny() -> ModelConfig:
  """About 1.2M parameters: a forward pass on two CPU cores takes milliseconds."""
  return ModelConfig(
      text=TextConfig(vocab_size=_TINY_VOCAB, hidden_size=128, intermediate_size=384, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=(4, 6, 6), tie_word_embeddings=True),
      vision=VisionConfig(kind="qwen2_5_vl", depth=2, hidden_size=64, intermediate_size=128,
                          num_heads=2, out_hidden_size=128, window_size=112,
                          fullatt_block_indexes=(1,), hidden_act="silu"),
      **_TINY_IDS)


def small() -> ModelConfig:
  """About 20M parameters: learns the small puzzles on a CPU in tens of minutes."""
  return ModelConfig(
      text=TextConfig(vocab_size=_TINY_VOCAB, hidden_size=384, intermediate_size=1024, num_layers=8,
                      num_heads=6, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=(8, 12, 12), tie_word_embeddings=True),
      vision=VisionConfig(kind="qwen2_5_vl", depth=8, hidden_size=256, intermediate_size=640,
                          num_heads=4, out_hidden_size=384, window_size=112,
                          fullatt_block_indexes=(3, 7), hidden_act="silu"),
      **_TINY_IDS)


def tiny_jigsaw() -> ModelConfig:
  """`tiny` with 22-pixel patches, no 2x2 patch merging and larger initial weights, for the CPU
  jigsaw miniature.

  Qwen's processor makes image sides multiples of patch * merge, so with merging every 2x1 seam
  falls exactly between two patches; without it (sides multiples of the patch only) an image an
  odd number of patches high has its seam inside a patch, where the patch embedding alone can see
  it. Measured with a vision probe on held-out bundled crops: 90% swap detection after 600
  supervised steps, against 71% with merging.

  The reference's initializer_range (0.02) suits wide towers; in this 64-wide vision tower and
  128-wide decoder it leaves the image's contribution to the answer so small that supervised
  training on 2x1 answers (batch 16, lr 1e-3, the full Jigsaw-R1 prompt) stayed at chance for 600
  steps. With draws of std 0.16 (vision) and 0.06 (decoder) the same run reached 82% held-out
  accuracy in 500 steps.

  Patches of 22 pixels instead of Qwen's 14 (the tower is trained from scratch, so nothing ties it
  to 14): at one number of image tokens, which sets most of the cost of a step, the image has
  more pixels along the seam. Measured with supervised answers (800 steps of 32, 128 held-out
  puzzles per size, 9x9 patches each): 2x1 91.4% at 126 pixels (patch 14), 93.8% at 162 (patch
  18), 96.1% at 198 (patch 22), in about the same time (263 s, 278 s, 309 s).
  """
  cfg = tiny()
  return dataclasses.replace(
      cfg, text=dataclasses.replace(cfg.text, initializer_range=0.06),
      vision=dataclasses.replace(cfg.vision, patch_size=22, spatial_merge_size=1,
                                 initializer_range=0.16))


PRESETS: Dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny_jigsaw": tiny_jigsaw,
    "small": small,
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen2_vl_2b": qwen2_vl_2b,
    "qwen3_vl_tiny": qwen3_vl_tiny,
    "qwen3_vl_2b": qwen3_vl_2b,
    "qwen3_vl_4b": qwen3_vl_4b,
    "qwen3_vl_8b": qwen3_vl_8b,
    # InternVL (models/internvl/presets.py).
    "internvl3_2b": internvl_presets.internvl3_2b,
    "internvl_tiny": lambda: internvl_presets.internvl_tiny(_TINY_VOCAB, _TINY_IDS),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named config, with ModelConfig fields overridden (dtype='bfloat16', remat=True, ...)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}.")
  return dataclasses.replace(PRESETS[name](), **overrides)


def count_params(preset: Union[str, ModelConfig]) -> int:
  """Number of parameters, from shapes only (jax.eval_shape: nothing is allocated)."""
  from jigsaw_jax.models import mllm
  cfg = get_preset(preset) if isinstance(preset, str) else preset
  shapes = jax.tree.leaves(mllm.abstract_params(cfg))
  return sum(math.prod(x.shape) for x in shapes)
