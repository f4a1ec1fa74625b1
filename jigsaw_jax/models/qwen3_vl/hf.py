"""Qwen3-VL's Hugging Face layout: tensor names and shapes, and config.json <-> our ModelConfig.

transformers writes Qwen3-VL checkpoints with its module names (`model.language_model.*`,
`model.visual.*`, `lm_head.weight`), as the released checkpoints are. `hf_io` matches tensors by
the canonical names `model.*` / `visual.*` it uses for every Qwen-VL; `export_name` turns them back
into Qwen3-VL's, so an export is laid out like the checkpoint it came from.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from jigsaw_jax.models.config import ModelConfig, TextConfig, VisionConfig
from jigsaw_jax.models.qwen3_vl import vision as qwen3_vision

MODEL_TYPE = "qwen3_vl"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
# (HF name relative to `visual.`, path in our tower's tree, 'linear' or 'copy', HF shape)
VisionEntry = Tuple[str, Tuple[str, ...], str, Tuple[int, ...]]


def export_name(canonical: str) -> str:
  """`model.layers.0...` -> `model.language_model.layers.0...`, `visual.x` -> `model.visual.x`."""
  if canonical.startswith("visual."):
    return "model." + canonical
  if canonical.startswith("model."):
    return "model.language_model." + canonical[len("model."):]
  return canonical


def vision_weight_map(cfg: VisionConfig) -> List[VisionEntry]:
  """Every tensor of the tower. 'linear': HF [out, in...] <-> ours [in..., out] (the patch
  embedding's Conv3d weight [E, C, T, P, P] included); 'copy': same values."""
  qwen3_vision.check_config(cfg)
  e, inter = cfg.hidden_size, cfg.intermediate_size
  merged = cfg.spatial_merge_size**2 * e
  entries: List[VisionEntry] = [
      ("patch_embed.proj.weight", ("patch_embed", "kernel"), "linear",
       (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)),
      ("patch_embed.proj.bias", ("patch_embed", "bias"), "copy", (e,)),
      ("pos_embed.weight", ("pos_embed",), "copy", (cfg.num_position_embeddings, e)),
  ]

  def linear(hf, ours, out, inp):
    entries.append((f"{hf}.weight", ours + ("kernel",), "linear", (out, inp)))
    entries.append((f"{hf}.bias", ours + ("bias",), "copy", (out,)))

  def layer_norm(hf, ours, width):
    entries.append((f"{hf}.weight", ours + ("scale",), "copy", (width,)))
    entries.append((f"{hf}.bias", ours + ("bias",), "copy", (width,)))

  for i in range(cfg.depth):
    hf, ours = f"blocks.{i}", (f"blocks_{i}",)
    layer_norm(f"{hf}.norm1", ours + ("norm1",), e)
    layer_norm(f"{hf}.norm2", ours + ("norm2",), e)
    linear(f"{hf}.attn.qkv", ours + ("attn", "qkv"), 3 * e, e)
    linear(f"{hf}.attn.proj", ours + ("attn", "proj"), e, e)
    linear(f"{hf}.mlp.linear_fc1", ours + ("mlp", "fc1"), inter, e)
    linear(f"{hf}.mlp.linear_fc2", ours + ("mlp", "fc2"), e, inter)
  layer_norm("merger.norm", ("merger", "ln_q"), e)
  linear("merger.linear_fc1", ("merger", "mlp_0"), merged, merged)
  linear("merger.linear_fc2", ("merger", "mlp_2"), cfg.out_hidden_size, merged)
  for k in range(len(cfg.deepstack_visual_indexes)):
    hf, ours = f"deepstack_merger_list.{k}", (f"deepstack_{k}",)
    layer_norm(f"{hf}.norm", ours + ("norm",), merged)
    linear(f"{hf}.linear_fc1", ours + ("linear_fc1",), merged, merged)
    linear(f"{hf}.linear_fc2", ours + ("linear_fc2",), cfg.out_hidden_size, merged)
  return entries


def _get(hf: Any, key: str, default=None):
  return hf.get(key, default) if isinstance(hf, dict) else getattr(hf, key, default)


def model_config_from_hf(hf: Any, error: type = ValueError) -> ModelConfig:
  """Our ModelConfig from transformers' Qwen3VLConfig (as transformers read config.json)."""
  tc, vc = hf.text_config, hf.vision_config
  rope = dict(tc.rope_parameters or {})
  if rope.get("rope_type", "default") != "default":
    raise error(f"rope_type {rope.get('rope_type')!r} is not supported; only 'default' (M-RoPE "
                "without scaling), as in the released Qwen3-VL checkpoints.")
  if getattr(tc, "attention_bias", False):
    raise error("attention_bias=true is not supported (Qwen3-VL has no q/k/v/o biases).")
  vision_rope_params = dict(_get(vc, "rope_parameters") or {})
  text = TextConfig(
      vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
      intermediate_size=tc.intermediate_size, num_layers=tc.num_hidden_layers,
      num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
      head_dim=tc.head_dim or tc.hidden_size // tc.num_attention_heads,
      rms_norm_eps=tc.rms_norm_eps, rope_theta=float(rope["rope_theta"]),
      # The reference falls back to (24, 20, 20) when the config names no sections.
      mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))), qkv_bias=False, qk_norm=True,
      mrope_interleaved=True, tie_word_embeddings=bool(hf.tie_word_embeddings),
      hidden_act=tc.hidden_act, initializer_range=float(getattr(tc, "initializer_range", 0.02)))
  patch = _get(vc, "patch_size")
  if not isinstance(patch, int):
    raise error(f"vision patch_size {patch!r}: only square patches (an int) are supported.")
  vis = VisionConfig(
      kind="qwen3_vl", depth=_get(vc, "depth"), hidden_size=_get(vc, "hidden_size"),
      intermediate_size=_get(vc, "intermediate_size"), num_heads=_get(vc, "num_heads"),
      in_channels=_get(vc, "in_channels"), patch_size=patch,
      temporal_patch_size=_get(vc, "temporal_patch_size"),
      spatial_merge_size=_get(vc, "spatial_merge_size"),
      out_hidden_size=_get(vc, "out_hidden_size"),
      window_size=0, fullatt_block_indexes=(), hidden_act=_get(vc, "hidden_act"),
      rope_theta=float(vision_rope_params.get("rope_theta", 10000.0)),
      norm_eps=qwen3_vision.LAYER_NORM_EPS,
      initializer_range=float(_get(vc, "initializer_range", 0.02)),
      num_position_embeddings=_get(vc, "num_position_embeddings"),
      deepstack_visual_indexes=tuple(_get(vc, "deepstack_visual_indexes")))
  return ModelConfig(text=text, vision=vis, image_token_id=hf.image_token_id,
                     video_token_id=hf.video_token_id,
                     vision_start_token_id=hf.vision_start_token_id,
                     vision_end_token_id=hf.vision_end_token_id)


def hf_config_from_model_config(cfg: ModelConfig, torch_dtype: str = "float32"):
  """transformers' Qwen3VLConfig describing `cfg` (the inverse of `model_config_from_hf`)."""
  import transformers
  t, v = cfg.text, cfg.vision
  if not (t.qk_norm and t.mrope_interleaved and not t.qkv_bias and t.mrope_section):
    raise ValueError("a Qwen3-VL export needs qk_norm=True, mrope_interleaved=True, "
                     "qkv_bias=False and an mrope_section.")
  token = lambda i: i if i < t.vocab_size else None  # Qwen's default ids don't fit tiny vocabs.
  text_config = dict(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
      num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, hidden_act=t.hidden_act,
      rms_norm_eps=t.rms_norm_eps, max_position_embeddings=262144, attention_bias=False,
      rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                           mrope_section=list(t.mrope_section), mrope_interleaved=True),
      bos_token_id=token(151643), eos_token_id=token(151645),
      initializer_range=t.initializer_range, tie_word_embeddings=t.tie_word_embeddings)
  vision_config = dict(
      depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
      out_hidden_size=v.out_hidden_size, hidden_act=v.hidden_act,
      num_position_embeddings=v.num_position_embeddings,
      deepstack_visual_indexes=list(v.deepstack_visual_indexes),
      rope_parameters={"rope_theta": v.rope_theta, "rope_type": "axial"},
      initializer_range=v.initializer_range)
  hf = transformers.Qwen3VLConfig(
      text_config=text_config, vision_config=vision_config, image_token_id=cfg.image_token_id,
      video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
      vision_end_token_id=cfg.vision_end_token_id, tie_word_embeddings=t.tie_word_embeddings)
  hf.architectures = [ARCHITECTURE]
  hf.dtype = torch_dtype
  return hf
