"""InternVL checkpoints <-> our parameter tree and configs (transformers' native `internvl`).

The vision entries of the name map (the decoder's come from `models/hf_io.py`, shared with the
Qwen-VL policies) and the config conversions. Names in the map are canonical: `vision_tower.*`,
`multi_modal_projector.*` and the decoder's `model.layers.*` / `lm_head.weight`.
`CANONICAL_PREFIXES` maps both layouts transformers reads to them: the in-memory one
(`model.language_model.*`, `model.vision_tower.*`, ...) and the one its save_pretrained writes
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`, ...), which is also
what `export_name` gives back on export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

from jigsaw_jax.models.config import ModelConfig, TextConfig
from jigsaw_jax.models.internvl.config import KIND, InternVisionConfig

# (entry prefix, canonical prefix); the first match wins.
CANONICAL_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
# Canonical -> the layout transformers' save_pretrained writes for InternVLForConditionalGeneration.
_EXPORT_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))

# (HF name, path under params['params'], 'linear' | 'copy', HF shape)
Entry = Tuple[str, Tuple[str, ...], str, Tuple[int, ...]]


def export_name(canonical: str) -> str:
  for prefix, written in _EXPORT_PREFIXES:
    if canonical.startswith(prefix):
      return written + canonical[len(prefix):]
  return canonical


def vision_weight_entries(v: InternVisionConfig) -> List[Entry]:
  """Every tensor of the InternViT tower and the projector, in canonical names."""
  v.check()
  e, inner, n = v.hidden_size, v.intermediate_size, v.patches_per_side ** 2
  wide, text = e * v.shuffle ** 2, v.out_hidden_size
  ours = ("visual",)
  entries: List[Entry] = [
      ("vision_tower.embeddings.cls_token", ours + ("cls_token",), "copy", (1, 1, e)),
      ("vision_tower.embeddings.position_embeddings", ours + ("position_embeddings",), "copy",
       (1, n + 1, e)),
      ("vision_tower.embeddings.patch_embeddings.projection.weight",
       ours + ("patch_embeddings", "kernel"), "linear", (e, v.in_channels, v.patch_size,
                                                           v.patch_size)),
      ("vision_tower.embeddings.patch_embeddings.projection.bias",
       ours + ("patch_embeddings", "bias"), "copy", (e,)),
  ]

  def linear(hf, path, out, inp, bias=True):
    entries.append((f"{hf}.weight", path + ("kernel",), "linear", (out, inp)))
    if bias:
      entries.append((f"{hf}.bias", path + ("bias",), "copy", (out,)))

  def norm(hf, path, layer_norm, width):
    entries.append((f"{hf}.weight", path + ("scale",), "copy", (width,)))
    if layer_norm:
      entries.append((f"{hf}.bias", path + ("bias",), "copy", (width,)))

  layer_norm = v.norm_type == "layer_norm"
  for i in range(v.depth):
    hf, path = f"vision_tower.encoder.layer.{i}", ours + (f"layer_{i}",)
    attn = path + ("attention",)
    for name in ("q_proj", "k_proj", "v_proj"):
      linear(f"{hf}.attention.{name}", attn + (name,), e, e, v.attention_bias)
    linear(f"{hf}.attention.projection_layer", attn + ("projection_layer",), e, e)
    if v.use_qk_norm:
      norm(f"{hf}.attention.q_norm", attn + ("q_norm",), False, e)
      norm(f"{hf}.attention.k_norm", attn + ("k_norm",), False, e)
    linear(f"{hf}.mlp.fc1", path + ("fc1",), inner, e)
    linear(f"{hf}.mlp.fc2", path + ("fc2",), e, inner)
    norm(f"{hf}.layernorm_before", path + ("layernorm_before",), layer_norm, e)
    norm(f"{hf}.layernorm_after", path + ("layernorm_after",), layer_norm, e)
    for name in ("lambda_1", "lambda_2"):
      entries.append((f"{hf}.{name}", path + (name,), "copy", (e,)))
  if not v.use_mean_pooling:
    norm("vision_tower.layernorm", ours + ("layernorm",), True, e)
  proj = ours + ("multi_modal_projector",)
  norm("multi_modal_projector.layer_norm", proj + ("layer_norm",), True, wide)
  linear("multi_modal_projector.linear_1", proj + ("linear_1",), text, wide)
  linear("multi_modal_projector.linear_2", proj + ("linear_2",), text, text)
  return entries


def _pair(value) -> int:
  """image_size / patch_size are ints or [h, w] in the HF config; InternVL's are square."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"non-square {value} is not supported: InternVL tiles are square.")
    return int(value[0])
  return int(value)


def vision_config_from_hf(hf) -> InternVisionConfig:
  """From a transformers InternVLConfig (the whole config: the projector lives at top level)."""
  v = hf.vision_config
  if hf.vision_feature_layer != -1 or hf.vision_feature_select_strategy != "default":
    raise ValueError(
        f"vision_feature_layer={hf.vision_feature_layer}, vision_feature_select_strategy="
        f"{hf.vision_feature_select_strategy!r} are not supported; InternVL checkpoints use -1 "
        "and 'default' (the last layer, without its CLS token).")
  if not v.use_absolute_position_embeddings or v.use_mask_token:
    raise ValueError("InternViT without absolute position embeddings (or with a mask token) is "
                     "not supported; InternVL checkpoints use them (and no mask token).")
  return InternVisionConfig(
      kind=KIND, depth=v.num_hidden_layers, hidden_size=v.hidden_size,
      intermediate_size=v.intermediate_size, num_heads=v.num_attention_heads,
      in_channels=v.num_channels, image_size=_pair(v.image_size), patch_size=_pair(v.patch_size),
      norm_type=v.norm_type, layer_norm_eps=float(v.layer_norm_eps),
      use_qk_norm=bool(v.use_qk_norm), attention_bias=bool(v.attention_bias),
      hidden_act=v.hidden_act, use_mean_pooling=bool(v.use_mean_pooling),
      downsample_ratio=float(hf.downsample_ratio), projector_hidden_act=hf.projector_hidden_act,
      out_hidden_size=hf.text_config.hidden_size,
      initializer_range=float(getattr(v, "initializer_range", 0.02)))


def vision_config_to_hf(v: InternVisionConfig) -> Dict[str, Any]:
  """kwargs of InternVLVisionConfig (the inverse of the above, vision part)."""
  return dict(
      model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.depth,
      num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
      num_channels=v.in_channels, image_size=[v.image_size, v.image_size],
      patch_size=[v.patch_size, v.patch_size], norm_type=v.norm_type,
      layer_norm_eps=v.layer_norm_eps, use_qk_norm=v.use_qk_norm,
      attention_bias=v.attention_bias, hidden_act=v.hidden_act,
      use_mean_pooling=v.use_mean_pooling, initializer_range=v.initializer_range)


def model_config_from_hf(hf, **overrides):
  """Our ModelConfig from a transformers InternVLConfig whose language model is Qwen2.

  `<img>` / `</img>` are not in a released config.json; InternVL's tokenizers add them just
  before `<IMG_CONTEXT>` (151665, 151666, 151667), which is what we assume unless the file names
  them (our exports do: `start_image_token_id`, `end_image_token_id`, `video_token_id`, as the
  tokenizer attributes are called). The processor checks the ids against its tokenizer.
  """
  tc = hf.text_config
  if tc.model_type != "qwen2":
    raise ValueError(
        f"InternVL with a {tc.model_type!r} language model is not supported; expected 'qwen2' "
        "(InternVL2.5 / InternVL3 at 1B-78B, e.g. OpenGVLab/InternVL3-2B-hf).")
  rope = dict(tc.rope_parameters or {})
  if rope.get("rope_type", "default") != "default" or getattr(tc, "use_sliding_window", False):
    raise ValueError(f"rope_type {rope.get('rope_type')!r} / use_sliding_window="
                     f"{getattr(tc, 'use_sliding_window', False)} are not supported; expected "
                     "plain RoPE without a sliding window, as the released checkpoints use.")
  text = TextConfig(
      vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
      intermediate_size=tc.intermediate_size, num_layers=tc.num_hidden_layers,
      num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
      head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
      rms_norm_eps=tc.rms_norm_eps, rope_theta=float(rope["rope_theta"]), mrope_section=None,
      qkv_bias=True, tie_word_embeddings=bool(hf.tie_word_embeddings), hidden_act=tc.hidden_act,
      initializer_range=float(getattr(tc, "initializer_range", 0.02)))
  image = int(hf.image_token_id)
  # Qwen's <|video_pad|> when the vocabulary has it: InternVL never emits it, and the sampler
  # suppresses it like the other placeholders.
  video = getattr(hf, "video_token_id", 151656 if tc.vocab_size > 151656 else image)
  cfg = ModelConfig(text=text, vision=vision_config_from_hf(hf), image_token_id=image,
                    video_token_id=int(video),
                    vision_start_token_id=int(getattr(hf, "start_image_token_id", image - 2)),
                    vision_end_token_id=int(getattr(hf, "end_image_token_id", image - 1)))
  return dataclasses.replace(cfg, **overrides)


def hf_config_from_model_config(cfg, torch_dtype: str = "float32"):
  """A transformers InternVLConfig describing `cfg` (vision kind 'internvl')."""
  import transformers
  t, v = cfg.text, cfg.vision
  if t.mrope_section is not None or not t.qkv_bias:
    raise ValueError("an InternVL export needs a Qwen2 decoder: mrope_section=None, qkv_bias=True.")
  if t.head_dim * t.num_heads != t.hidden_size:
    raise ValueError(f"transformers derives head_dim = hidden_size / num_heads = "
                     f"{t.hidden_size // t.num_heads}, but the config has head_dim={t.head_dim}.")
  text_config = dict(
      model_type="qwen2", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
      num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
      hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
      rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta),
      use_sliding_window=False, tie_word_embeddings=t.tie_word_embeddings,
      initializer_range=t.initializer_range, bos_token_id=None, eos_token_id=None)
  hf = transformers.InternVLConfig(
      vision_config=vision_config_to_hf(v), text_config=text_config,
      image_token_id=cfg.image_token_id, image_seq_length=v.tokens_per_tile,
      downsample_ratio=v.downsample_ratio, projector_hidden_act=v.projector_hidden_act,
      tie_word_embeddings=t.tie_word_embeddings)
  hf.start_image_token_id, hf.end_image_token_id = (cfg.vision_start_token_id,
                                                    cfg.vision_end_token_id)
  hf.video_token_id = cfg.video_token_id
  hf.architectures = ["InternVLForConditionalGeneration"]
  hf.dtype = torch_dtype
  return hf
