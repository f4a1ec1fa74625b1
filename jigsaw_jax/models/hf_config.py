"""Checkpoint configs both ways: our ModelConfig from a Hugging Face config.json, and the
transformers config object that describes one of ours (for export), for every policy we take
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Dict, Mapping

from jigsaw_jax.models import vision_hf
from jigsaw_jax.models.config import ModelConfig, TextConfig
from jigsaw_jax.models.internvl import hf_io as internvl_hf
from jigsaw_jax.models.qwen3_vl import hf as qwen3_vl_hf

PathLike = os.PathLike | str

_ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                  "qwen2_vl": "Qwen2VLForConditionalGeneration",
                  qwen3_vl_hf.MODEL_TYPE: qwen3_vl_hf.ARCHITECTURE,
                  "internvl": "InternVLForConditionalGeneration"}


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model; the message lists every problem."""


def read_config(directory: PathLike) -> Dict[str, Any]:
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise CheckpointError(
        f"{str(directory)!r} has no config.json. Expected a HF model directory as written by "
        "save_pretrained (config.json + model.safetensors or model.safetensors.index.json); point "
        "at the directory that holds config.json.")
  return json.loads(path.read_text())




def _hf_config_object(config: Mapping[str, Any]):
  """The dict as transformers itself reads it (defaults, legacy flat keys, rope_scaling...)."""
  import transformers
  model_type = config.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise CheckpointError(
        f"config.json has model_type {model_type!r}; expected one of {sorted(_ARCHITECTURES)} "
        "(a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or InternVL checkpoint).")
  try:
    return transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
  except Exception as e:  # transformers validates configs; say which file failed.
    raise CheckpointError(f"transformers cannot read this config.json as {model_type}: {e}. "
                          "Fix the file (or re-export the checkpoint).") from e


def model_config_from_hf(config: Mapping[str, Any], **overrides) -> ModelConfig:
  """Our ModelConfig from a checkpoint's config.json (as a dict). `overrides` set ModelConfig
  fields such as dtype, param_dtype, remat or attention_impl."""
  hf = _hf_config_object(config)
  if config.get("model_type") == qwen3_vl_hf.MODEL_TYPE:
    return dataclasses.replace(qwen3_vl_hf.model_config_from_hf(hf, CheckpointError), **overrides)
  if hf.model_type == internvl_hf.KIND:
    return internvl_hf.model_config_from_hf(hf, **overrides)
  tc = hf.text_config
  rope = dict(tc.rope_parameters or {})
  if rope.get("rope_type", "default") != "default":
    raise CheckpointError(f"rope_type {rope.get('rope_type')!r} is not supported; only 'default' "
                          "(M-RoPE without scaling), as in the released Qwen-VL checkpoints.")
  if getattr(tc, "use_sliding_window", False):
    raise CheckpointError("use_sliding_window=true is not supported (the released Qwen-VL "
                          "checkpoints set it false).")
  text = TextConfig(
      vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
      intermediate_size=tc.intermediate_size, num_layers=tc.num_hidden_layers,
      num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
      head_dim=tc.hidden_size // tc.num_attention_heads, rms_norm_eps=tc.rms_norm_eps,
      rope_theta=float(rope["rope_theta"]),
      # The reference falls back to (16, 24, 24) when the config names no sections.
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))), qkv_bias=True,
      tie_word_embeddings=bool(hf.tie_word_embeddings), hidden_act=tc.hidden_act,
      initializer_range=float(getattr(tc, "initializer_range", 0.02)))
  cfg = ModelConfig(
      text=text, vision=vision_hf.vision_config_from_hf(hf.vision_config),
      image_token_id=hf.image_token_id, video_token_id=hf.video_token_id,
      vision_start_token_id=hf.vision_start_token_id, vision_end_token_id=hf.vision_end_token_id)
  return dataclasses.replace(cfg, **overrides)


def hf_config_from_model_config(cfg: ModelConfig, torch_dtype: str = "float32"):
  """A transformers config object (Qwen2_5_VLConfig / Qwen2VLConfig) describing `cfg`."""
  import transformers
  if cfg.vision is None:
    raise ValueError("export needs a vision tower: cfg.vision is None.")
  if cfg.vision.kind == qwen3_vl_hf.MODEL_TYPE:
    return qwen3_vl_hf.hf_config_from_model_config(cfg, torch_dtype)
  if cfg.vision.kind == internvl_hf.KIND:
    return internvl_hf.hf_config_from_model_config(cfg, torch_dtype)
  t = cfg.text
  if t.head_dim * t.num_heads != t.hidden_size:
    raise ValueError(f"transformers derives head_dim = hidden_size / num_heads = "
                     f"{t.hidden_size // t.num_heads}, but the config has head_dim={t.head_dim}.")
  if t.mrope_section is None or not t.qkv_bias:
    raise ValueError("a Qwen-VL export needs mrope_section and qkv_bias=True.")
  model_type = cfg.vision.kind
  token = lambda i: i if i < t.vocab_size else None  # Qwen's default ids don't fit tiny vocabs.
  text_config = dict(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
      num_key_value_heads=t.num_kv_heads, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
      max_position_embeddings=128000 if model_type == "qwen2_5_vl" else 32768,
      rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                           mrope_section=list(t.mrope_section)),
      bos_token_id=token(151643), eos_token_id=token(151645), use_sliding_window=False,
      initializer_range=t.initializer_range)
  config_cls = transformers.CONFIG_MAPPING[model_type]
  hf = config_cls(
      text_config=text_config, vision_config=vision_hf.vision_config_to_hf(cfg.vision),
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      vision_start_token_id=cfg.vision_start_token_id,
      vision_end_token_id=cfg.vision_end_token_id, tie_word_embeddings=t.tie_word_embeddings)
  hf.architectures = [_ARCHITECTURES[model_type]]
  hf.dtype = torch_dtype
  return hf
