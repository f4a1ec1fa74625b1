"""InternVL model shapes: the released 2B-class checkpoint and a CPU-sized one.

`internvl3_2b` is OpenGVLab/InternVL3-2B-hf (transformers' native layout of OpenGVLab/InternVL3-2B,
the successor of the InternVL2.5-2B that Jigsaw-R1 trains): InternViT-300M-448px-V2_5 (24 layers,
width 1024, 16 heads, MLP 4096, LayerNorm eps 1e-6, q/k/v biases, no QK-norm, no final norm),
pixel shuffle 0.5, a GELU MLP projector to 1536, and Qwen2.5-1.5B as the language model (28
layers, width 1536, 12 heads with 2 KV heads, MLP 8960, RoPE theta 1e6, vocabulary 151674 with
InternVL's added tokens, <IMG_CONTEXT> = 151667 between <img> = 151665 and </img> = 151666, an
untied lm_head). Sources read for these numbers: OpenGVLab's script that converts InternVL
checkpoints to the -hf layout (its InternViT-300M vision config, image_token_id 151667,
image_seq_length 256, the <img>/<IMG_CONTEXT>/</img> tokens and chat template); a published
InternVL config of this 2B class (text_config: vocab_size 151674, hidden_size 1536, 28 layers, 12
query and 2 KV heads, head_dim 128); InternVL2.5's internvl_chat config.json (tie_word_embeddings
false); and InternVL3-2B's bf16 model.safetensors of 4.18 GB, i.e. 2.09B parameters, which is
what an untied head gives (`count_params` here: 2,088,957,440; tied it would be 1.86B). The MLP
size 8960 and RoPE theta 1e6 are Qwen2.5-1.5B's. `hf_io.model_config_from_hf` reads the real
config.json, so a checkpoint never depends on these values.

`internvl_tiny` keeps every part of the architecture at CPU scale (56-pixel tiles of 4x4
patches: 4 image tokens a tile) with the vocabulary of the tokenizer in `assets/tokenizer_tiny`,
whose <|vision_start|>, <|image_pad|>, <|vision_end|> play <img>, <IMG_CONTEXT>, </img>.
"""

from __future__ import annotations

from jigsaw_jax.models.config import ModelConfig, TextConfig
from jigsaw_jax.models.internvl.config import InternVisionConfig


def internvl3_2b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=151674, hidden_size=1536, intermediate_size=8960, num_layers=28,
                      num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=None, tie_word_embeddings=False),
      vision=InternVisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                image_size=448, patch_size=14, norm_type="layer_norm",
                                use_qk_norm=False, attention_bias=True, use_mean_pooling=True,
                                out_hidden_size=1536),
      image_token_id=151667, video_token_id=151656, vision_start_token_id=151665,
      vision_end_token_id=151666)


def internvl_tiny(vocab_size: int, ids: dict) -> ModelConfig:
  """`ids`: the tiny tokenizer's image_token_id, video_token_id, vision_start/end_token_id."""
  return ModelConfig(
      text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                      rope_theta=1e6, mrope_section=None, tie_word_embeddings=True),
      vision=InternVisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                image_size=56, patch_size=14, out_hidden_size=128),
      **ids)
