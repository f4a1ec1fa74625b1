"""The Qwen2-VL / Qwen2.5-VL vision tower in the Hugging Face checkpoint layout: which HF tensor
is which of our parameters, their shapes and transforms, and the tower config both ways."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import flax.linen as nn
import numpy as np

from jigsaw_jax.models.config import VisionConfig
from jigsaw_jax.models.vision import check_config



WeightMap = List[Tuple[str, Tuple[str, ...], str]]
TRANSFORMS = ("linear", "copy", "conv3d_as_linear")


def hf_weight_map(cfg: VisionConfig) -> WeightMap:
  """(HF name relative to the tower, path in our param tree, transform) for every tensor.

  Transforms: 'linear' HF `[out, in]` <-> ours `[in, out]`; 'copy' (biases, norms);
  'conv3d_as_linear' HF `[E, C, T, P, P]` <-> ours `[C*T*P*P, E]`.
  The HF prefix is not included: `visual.` in original Qwen checkpoints, `model.visual.` in
  checkpoints written by transformers >= 5.
  """
  check_config(cfg, "xla")
  entries: WeightMap = [("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv3d_as_linear")]
  norm_params = [("weight", "scale")] + ([("bias", "bias")] if cfg.kind == "qwen2_vl" else [])

  def linear(hf: str, ours: Tuple[str, ...]):
    entries.append((f"{hf}.weight", ours + ("kernel",), "linear"))
    entries.append((f"{hf}.bias", ours + ("bias",), "copy"))

  def norm(hf: str, ours: Tuple[str, ...]):
    for hf_param, our_param in norm_params:
      entries.append((f"{hf}.{hf_param}", ours + (our_param,), "copy"))

  mlp_layers = ("gate_proj", "up_proj", "down_proj") if cfg.kind == "qwen2_5_vl" else ("fc1", "fc2")
  for i in range(cfg.depth):
    hf, ours = f"blocks.{i}", (f"blocks_{i}",)
    norm(f"{hf}.norm1", ours + ("norm1",))
    norm(f"{hf}.norm2", ours + ("norm2",))
    linear(f"{hf}.attn.qkv", ours + ("attn", "qkv"))
    linear(f"{hf}.attn.proj", ours + ("attn", "proj"))
    for layer in mlp_layers:
      linear(f"{hf}.mlp.{layer}", ours + ("mlp", layer))
  norm("merger.ln_q", ("merger", "ln_q"))
  linear("merger.mlp.0", ("merger", "mlp_0"))
  linear("merger.mlp.2", ("merger", "mlp_2"))
  return entries


def hf_shapes(cfg: VisionConfig) -> Dict[str, Tuple[int, ...]]:
  """Shape of every HF tensor of the tower (relative names), to refuse mismatched checkpoints."""
  e, i, merged = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size**2 * cfg.hidden_size
  linear_out_in = {  # by the last two components of the HF module name
      "attn.qkv": (3 * e, e), "attn.proj": (e, e),
      "mlp.gate_proj": (i, e), "mlp.up_proj": (i, e), "mlp.down_proj": (e, i),
      "mlp.fc1": (i, e), "mlp.fc2": (e, i),
      "mlp.0": (merged, merged), "mlp.2": (cfg.out_hidden_size, merged),
  }
  shapes = {}
  for name, _, kind in hf_weight_map(cfg):
    module = ".".join(name.split(".")[-3:-1])
    if kind == "conv3d_as_linear":
      shapes[name] = (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    elif module in linear_out_in:
      out_in = linear_out_in[module]
      shapes[name] = out_in if kind == "linear" else out_in[:1]
    else:  # norm1, norm2, ln_q
      shapes[name] = (e,)
  return shapes


def hf_to_ours(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(value.T)
  if kind == "copy":
    return value
  if kind == "conv3d_as_linear":
    return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
  raise ValueError(f"unknown transform {kind!r}: expected one of {TRANSFORMS}.")


def ours_to_hf(kind: str, value: np.ndarray, hf_shape: Tuple[int, ...]) -> np.ndarray:
  if kind in ("linear", "conv3d_as_linear"):
    return np.ascontiguousarray(value.T).reshape(hf_shape)
  if kind == "copy":
    return value
  raise ValueError(f"unknown transform {kind!r}: expected one of {TRANSFORMS}.")


def params_from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray], cfg: VisionConfig, prefix: str = "", dtype=None
) -> Dict[str, Any]:
  """Our param tree (the value of `{'params': ...}`) from HF tensors named `prefix + relative`.

  Keys of `state_dict` that do not start with `prefix` are ignored (so a whole-model state dict
  can be passed); keys under `prefix` that the tower does not know are an error, as are missing
  keys and wrong shapes. `dtype` (e.g. 'bfloat16') casts every tensor; default keeps theirs.
  """
  expected = hf_shapes(cfg)
  ours_names = {prefix + name for name, _, _ in hf_weight_map(cfg)}
  missing = sorted(ours_names - set(state_dict))
  unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in ours_names)
  if missing or unexpected:
    raise KeyError(
        f"vision tower checkpoint (prefix {prefix!r}, kind {cfg.kind!r}, depth {cfg.depth}) does "
        f"not match: missing {missing[:8]}{'...' if len(missing) > 8 else ''} "
        f"({len(missing)} total), unexpected {unexpected[:8]}"
        f"{'...' if len(unexpected) > 8 else ''} ({len(unexpected)} total). Check the prefix "
        "('visual.' in Qwen checkpoints, 'model.visual.' in transformers>=5 saves) and the config.")
  params: Dict[str, Any] = {}
  for name, path, kind in hf_weight_map(cfg):
    value = np.asarray(state_dict[prefix + name])
    if tuple(value.shape) != expected[name]:
      raise ValueError(
          f"checkpoint tensor {prefix + name} has shape {tuple(value.shape)}, expected "
          f"{expected[name]} from the VisionConfig; the config does not describe this checkpoint.")
    value = hf_to_ours(kind, value)
    if dtype is not None:
      value = value.astype(dtype)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return params


def params_to_hf_state_dict(
    params: Mapping[str, Any], cfg: VisionConfig, prefix: str = ""
) -> Dict[str, np.ndarray]:
  """HF tensors `{prefix + relative name: array}` from our param tree (inverse of the above)."""
  params = nn.meta.unbox(params)
  shapes = hf_shapes(cfg)
  out = {}
  for name, path, kind in hf_weight_map(cfg):
    node = params
    for key in path:
      if key not in node:
        raise KeyError(f"param tree has no {'/'.join(path)} (needed for HF tensor {name}).")
      node = node[key]
    out[prefix + name] = ours_to_hf(kind, np.asarray(node), shapes[name])
  return out


def vision_config_from_hf(hf) -> VisionConfig:
  """Our VisionConfig from a transformers Qwen2_5_VLVisionConfig / Qwen2VLVisionConfig (or dict)."""
  get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, Mapping) else (lambda k, d=None: getattr(hf, k, d))
  rope = get("rope_parameters") or {}
  theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)))
  model_type = get("model_type", "")
  if model_type.startswith("qwen2_5_vl"):
    return VisionConfig(
        kind="qwen2_5_vl", depth=get("depth"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_heads=get("num_heads"),
        in_channels=get("in_channels"), patch_size=get("patch_size"),
        temporal_patch_size=get("temporal_patch_size"),
        spatial_merge_size=get("spatial_merge_size"), out_hidden_size=get("out_hidden_size"),
        window_size=get("window_size"), fullatt_block_indexes=tuple(get("fullatt_block_indexes")),
        hidden_act=get("hidden_act"), rope_theta=theta,
        initializer_range=float(get("initializer_range", 0.02)))
  if model_type.startswith("qwen2_vl"):
    # Qwen2-VL names the width `embed_dim` and the output width `hidden_size`.
    return VisionConfig(
        kind="qwen2_vl", depth=get("depth"), hidden_size=get("embed_dim"),
        intermediate_size=int(get("embed_dim") * get("mlp_ratio")), num_heads=get("num_heads"),
        in_channels=get("in_channels"), patch_size=get("patch_size"),
        temporal_patch_size=get("temporal_patch_size"),
        spatial_merge_size=get("spatial_merge_size"), out_hidden_size=get("hidden_size"),
        fullatt_block_indexes=(), hidden_act=get("hidden_act"), rope_theta=theta,
        initializer_range=float(get("initializer_range", 0.02)))
  raise ValueError(
      f"vision config model_type {model_type!r}: expected 'qwen2_5_vl_vision' or 'qwen2_vl_vision'.")


def vision_config_to_hf(cfg: VisionConfig) -> Dict[str, Any]:
  """kwargs for transformers' vision config class of `cfg.kind` (inverse of the above)."""
  common = dict(depth=cfg.depth, num_heads=cfg.num_heads, in_channels=cfg.in_channels,
                patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                spatial_merge_size=cfg.spatial_merge_size, hidden_act=cfg.hidden_act,
                rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "axial"},
                initializer_range=cfg.initializer_range)
  if cfg.kind == "qwen2_5_vl":
    return dict(common, model_type="qwen2_5_vl_vision", hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, out_hidden_size=cfg.out_hidden_size,
                window_size=cfg.window_size, fullatt_block_indexes=list(cfg.fullatt_block_indexes))
  if cfg.intermediate_size % cfg.hidden_size:
    raise ValueError(
        f"Qwen2-VL stores mlp_ratio = intermediate_size / hidden_size; {cfg.intermediate_size} / "
        f"{cfg.hidden_size} is not an integer.")
  return dict(common, model_type="qwen2_vl_vision", embed_dim=cfg.hidden_size,
              mlp_ratio=cfg.intermediate_size // cfg.hidden_size, hidden_size=cfg.out_hidden_size)
