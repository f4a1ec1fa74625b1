"""Presets have the released models' shapes: parameter counts and config.json agree."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from jigsaw_jax.models import hf_io, mllm, presets

# Parameter totals of the released checkpoints, as the Hugging Face Hub reports them
# ("numParameters" / safetensors total, e.g. recorded in MTEB's model metadata for models built on
# these checkpoints: Alibaba-NLP/GVE-3B and -7B = Qwen2.5-VL-3B/7B, llamaindex/vdr-2b-multi-v1 =
# Qwen2-VL-2B), and the sum of the shapes that each config.json implies.
PUBLISHED_PARAMS = {
    "qwen2_5_vl_3b": 3_754_622_976,  # Qwen/Qwen2.5-VL-3B-Instruct (tied embeddings)
    "qwen2_5_vl_7b": 8_292_166_656,  # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2_vl_2b": 2_208_985_600,  # Qwen/Qwen2-VL-2B-Instruct (tied embeddings)
}

# The released config.json files (keys that carry the architecture; verbatim values). Legacy
# spellings (flat text keys, rope_scaling, in_chans, vision model_type "qwen2_5_vl", absent vision
# fields that take transformers' defaults) are kept on purpose: that is what users load.
_COMMON = dict(attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, hidden_act="silu",
               image_token_id=151655, initializer_range=0.02, rms_norm_eps=1e-06,
               rope_theta=1000000.0, sliding_window=32768, torch_dtype="bfloat16",
               use_cache=True, use_sliding_window=False, video_token_id=151656,
               vision_end_token_id=151653, vision_start_token_id=151652,
               vision_token_id=151654)
PUBLISHED_CONFIGS = {
    "qwen2_5_vl_3b": dict(
        _COMMON, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        hidden_size=2048, intermediate_size=11008, max_position_embeddings=128000,
        max_window_layers=70, num_attention_heads=16, num_hidden_layers=36,
        num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        vision_config={"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl",
                       "out_hidden_size": 2048, "spatial_patch_size": 14,
                       "tokens_per_second": 2, "torch_dtype": "bfloat16"}),
    "qwen2_5_vl_7b": dict(
        _COMMON, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        hidden_size=3584, intermediate_size=18944, max_position_embeddings=128000,
        max_window_layers=28, num_attention_heads=28, num_hidden_layers=28,
        num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064,
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        vision_config={"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl",
                       "spatial_patch_size": 14, "tokens_per_second": 2,
                       "torch_dtype": "bfloat16"}),
    "qwen2_vl_2b": dict(
        _COMMON, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
        hidden_size=1536, intermediate_size=8960, max_position_embeddings=32768,
        max_window_layers=28, num_attention_heads=12, num_hidden_layers=28,
        num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        vision_config={"hidden_size": 1536, "in_chans": 3, "model_type": "qwen2_vl",
                       "spatial_patch_size": 14}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_the_released_model(name):
  count = presets.count_params(name)
  published = PUBLISHED_PARAMS[name]
  assert abs(count - published) <= 1e-3 * published, (name, count, published)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_released_config_json_reads_as_the_preset(name):
  assert hf_io.model_config_from_hf(PUBLISHED_CONFIGS[name]) == presets.get_preset(name)


def test_cpu_presets_are_cpu_sized():
  assert 1_000_000 <= presets.count_params("tiny") <= 5_000_000
  assert 15_000_000 <= presets.count_params("small") <= 30_000_000


def test_cpu_presets_use_the_tiny_tokenizer():
  from jigsaw_jax.models import tokenizer
  tok = tokenizer.load_tokenizer(None)
  ids = tokenizer.special_token_ids(tok)
  for name in ("tiny", "small"):
    cfg = presets.get_preset(name)
    assert cfg.text.vocab_size >= len(tok)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id) == (ids.image_pad, ids.video_pad, ids.vision_start,
                                         ids.vision_end)


def test_large_presets_have_logical_axes_without_allocating():
  specs = mllm.logical_axes(presets.get_preset("qwen2_5_vl_7b", dtype="bfloat16"))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) > 500 and all(isinstance(s, jax.sharding.PartitionSpec) for s in leaves)
  embedding = specs["params"]["decoder"]["embed_tokens"]["embedding"]
  assert tuple(embedding) == ("vocab", "embed")


def test_get_preset_overrides_and_errors():
  cfg = presets.get_preset("tiny", dtype="bfloat16", remat=True)
  assert cfg.dtype == "bfloat16" and cfg.remat
  assert dataclasses.replace(cfg, dtype="float32", remat=False) == presets.get_preset("tiny")
  with pytest.raises(ValueError, match="unknown model preset 'qwen3'.*tiny"):
    presets.get_preset("qwen3")
  with pytest.raises(ValueError, match="unknown ModelConfig fields \\['dtpye'\\]"):
    presets.get_preset("tiny", dtpye="bfloat16")
