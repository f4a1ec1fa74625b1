"""InternVL's image encoder in Flax linen: InternViT, pixel shuffle and the MLP projector.

The same function as transformers' `InternVLModel.get_image_features` (vision_feature_layer -1,
select strategy "default"):

    tiles [T, C*H*W] --patch embed (Conv2d as a matmul) + CLS + position embeddings-->
    [T, 1 + N, E] --depth x InternViT layer--> drop CLS --> [T, sqrt N, sqrt N, E]
    --pixel shuffle (2x2 patches -> one 4E token)--> [T, N/4, 4E]
    --LayerNorm, Linear, GELU, Linear--> [T * N/4, text hidden]

An InternViT layer: x + lambda_1 * attn(norm_before(x)), then x + lambda_2 * mlp(norm_after(x)),
with full bidirectional attention inside each tile and, for InternViT-6B, RMS-normed q and k
(over the whole width, before the head split). Parameter names follow transformers' modules so
the name map in `internvl/hf_io.py` reads one-to-one.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import vision as qwen_vision
from jigsaw_jax.models.internvl.config import KIND, InternVisionConfig  # pylint: disable=unused-import (KIND: the dispatch key mllm reads)

Array = jax.Array
# The reference's projector LayerNorm is torch's default (eps 1e-5), whatever layer_norm_eps says;
# its q/k RMSNorms use 1e-6.
PROJECTOR_NORM_EPS = 1e-5
QK_NORM_EPS = 1e-6


def _dense(features, axes, name, dtype, param_dtype, use_bias=True):
  return qwen_vision._dense(features, axes, name=name, dtype=dtype, param_dtype=param_dtype,  # pylint: disable=protected-access
                            use_bias=use_bias)


def _layer_norm(eps, name, dtype, param_dtype):
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


def _norm(cfg: InternVisionConfig, name, dtype, param_dtype):
  if cfg.norm_type == "rms_norm":
    return qwen_vision.RMSNorm(cfg.layer_norm_eps, dtype, param_dtype, name=name)
  return _layer_norm(cfg.layer_norm_eps, name, dtype, param_dtype)


def _constrain(x, *names):
  return nn.with_logical_constraint(x, names)


class InternVisionAttention(nn.Module):
  cfg: InternVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [T, S, E] -> [T, S, E]
    cfg = self.cfg
    t, s, e = x.shape
    heads, head_dim = cfg.num_heads, e // cfg.num_heads
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(e, ("embed", "heads"), "q_proj", use_bias=cfg.attention_bias)(x)
    k = dense(e, ("embed", "heads"), "k_proj", use_bias=cfg.attention_bias)(x)
    v = dense(e, ("embed", "heads"), "v_proj", use_bias=cfg.attention_bias)(x)
    if cfg.use_qk_norm:
      q = qwen_vision.RMSNorm(QK_NORM_EPS, self.dtype, self.param_dtype, name="q_norm")(q)
      k = qwen_vision.RMSNorm(QK_NORM_EPS, self.dtype, self.param_dtype, name="k_norm")(k)
    split = lambda y: y.reshape(t, s, heads, head_dim)
    scores = jnp.einsum("tqhd,tkhd->thqk", split(q), split(k),
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("thqk,tkhd->tqhd", probs, split(v)).reshape(t, s, e)
    out = _constrain(out, "activation_batch", "activation_length", "activation_embed")
    return dense(e, ("heads", "embed"), "projection_layer")(out)


class InternVisionLayer(nn.Module):
  cfg: InternVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    scale = lambda name: self.param(
        name, nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        (cfg.hidden_size,), self.param_dtype).astype(self.dtype)
    h = InternVisionAttention(cfg, self.dtype, self.param_dtype, name="attention")(
        _norm(cfg, "layernorm_before", self.dtype, self.param_dtype)(x))
    x = x + scale("lambda_1") * h
    h = _norm(cfg, "layernorm_after", self.dtype, self.param_dtype)(x)
    h = qwen_vision.ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, ("embed", "mlp"),
                                                      "fc1")(h))
    h = _constrain(h, "activation_batch", "activation_length", "activation_mlp")
    h = dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(h)
    x = x + scale("lambda_2") * h
    return _constrain(x, "activation_batch", "activation_length", "activation_embed")


def pixel_shuffle(features: Array, block: int) -> Array:
  """[T, H, W, C] -> [T, H/b * W/b, b*b*C]: token (i, j) holds patches (b*i + di, b*j + dj) in
  row-major (di, dj) order, the channel layout of the reference's view/permute sequence."""
  t, h, w, c = features.shape
  x = features.reshape(t, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(t, (h // block) * (w // block), block * block * c)


class InternVisionTower(nn.Module):
  """Tiles -> image-context features, one row per <IMG_CONTEXT> token (tile by tile).

  Attributes:
    cfg: the tower's shape.
    dtype / param_dtype: compute and storage dtype names.
    remat: rematerialise each layer in the backward pass.
  """

  cfg: InternVisionConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values: Array, grid_thw=None) -> Array:
    """pixel_values [T, C*H*W]: each row one tile, channels first, as the processor emits them.
    `grid_thw` (the pipeline's (tiles, 1, 1) per image) is not needed: tiles are independent."""
    cfg = self.cfg
    cfg.check()
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.tile_dim:
      raise ValueError(
          f"pixel_values has shape {tuple(pixel_values.shape)}, expected [tiles, {cfg.tile_dim}] "
          f"(each row one {cfg.image_size}x{cfg.image_size} tile with {cfg.in_channels} channels, "
          "channels first). Build them with the InternVL processor.")
    t, c, p, n = pixel_values.shape[0], cfg.in_channels, cfg.patch_size, cfg.patches_per_side
    patches = pixel_values.astype(dtype).reshape(t, c, n, p, n, p).transpose(0, 2, 4, 1, 3, 5)
    x = _dense(cfg.hidden_size, (None, "embed"), "patch_embeddings", dtype, param_dtype)(
        patches.reshape(t, n * n, c * p * p))
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
    cls = self.param("cls_token", init, (cfg.hidden_size,), param_dtype).astype(dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (t, 1, cfg.hidden_size)), x], axis=1)
    positions = self.param(
        "position_embeddings",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (n * n + 1, cfg.hidden_size), param_dtype)
    x = _constrain(x + positions.astype(dtype), "activation_batch", "activation_length",
                   "activation_embed")
    layer_cls = nn.remat(InternVisionLayer) if self.remat else InternVisionLayer
    for i in range(cfg.depth):
      x = layer_cls(cfg, dtype, param_dtype, name=f"layer_{i}")(x)
    if not cfg.use_mean_pooling:
      x = _layer_norm(cfg.layer_norm_eps, "layernorm", dtype, param_dtype)(x)
    x = pixel_shuffle(x[:, 1:].reshape(t, n, n, cfg.hidden_size), cfg.shuffle)
    return InternVLProjector(cfg, dtype, param_dtype, name="multi_modal_projector")(
        x).reshape(t * cfg.tokens_per_tile, cfg.out_hidden_size)


class InternVLProjector(nn.Module):
  """LayerNorm (eps 1e-5), Linear, activation, Linear: shuffled patches -> the LM's width."""

  cfg: InternVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = _layer_norm(PROJECTOR_NORM_EPS, "layer_norm", self.dtype, self.param_dtype)(x)
    x = qwen_vision.ACTIVATIONS[cfg.projector_hidden_act](
        dense(cfg.out_hidden_size, (None, "mlp"), "linear_1")(x))
    x = _constrain(x, "activation_batch", "activation_length", "activation_mlp")
    return dense(cfg.out_hidden_size, ("mlp", "embed"), "linear_2")(x)


def dummy_pixels(cfg: InternVisionConfig):
  """One blank tile and the number of image-context tokens it fills (for init)."""
  return np.zeros((1, cfg.tile_dim), np.float32), cfg.tokens_per_tile
