"""The Qwen2-VL / Qwen2.5-VL vision tower in Flax linen, numerically equal to transformers.

    pixel_values [N, C*T*P*P] --patch_embed--> [N, E] --blocks x depth--> [N, E] --merger--> [N/m^2, out]

Two families share the skeleton (`VisionConfig.kind`):

  * "qwen2_5_vl": RMSNorm, SwiGLU MLP (gate/up/down, with biases), attention inside windows of
    `window_size` pixels except at `fullatt_block_indexes`; merger norm is RMSNorm.
  * "qwen2_vl": LayerNorm, fc1 -> act (quick_gelu) -> fc2 MLP, full attention in every block;
    merger norm is LayerNorm.

Tokens stay in the processor's order from start to end. The reference permutes the sequence into
window order and back; we get the same result without moving the residual stream, because every
op except attention is per token and attention gathers its segments (frames or windows, in the
reference's window order) through static index tables (see vision_rope.py). The merger then fuses
each run of m^2 consecutive patches, exactly the reference's output order.

The HF checkpoint layout is in vision_hf.py, used for import and export.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.models import vision_rope
from jigsaw_jax.models.config import VisionConfig

KINDS = ("qwen2_5_vl", "qwen2_vl")
ATTENTION_IMPLS = ("xla", "cudnn")


def _dtype(name: str) -> jnp.dtype:
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype {name!r}: expected 'float32', 'bfloat16' or 'float16'.")
  return jnp.dtype(name)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# Names as in transformers' ACT2FN; "gelu" there is the exact (erf) GELU.
ACTIVATIONS: Dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "silu": jax.nn.silu,
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"vision hidden_act {name!r}: expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _dense(features: int, axes: Tuple[Any, Any], *, name: str, dtype, param_dtype, use_bias=True):
  """nn.Dense with logically partitioned kernel `[in, out]` (and bias `[out]`)."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
      name=name,
  )


def _constrain(x, *names):
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """x / rms(x) in float32, cast back to the compute dtype, then scaled (the reference's order)."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def _norm(kind: str, eps: float, name: str, dtype, param_dtype) -> nn.Module:
  if kind == "qwen2_5_vl":
    return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name)


def segment_attention(q, k, v, lengths, *, padded: bool, impl: str) -> jnp.ndarray:
  """Softmax attention inside each row of a padded segment batch.

  Args:
    q, k, v: `[S, L, heads, head_dim]`.
    lengths: int32 `[S]`; keys at slots >= length are padding and get no weight.
    padded: whether any segment is shorter than L (static; skips the mask when not).
    impl: "xla" (einsum + float32 softmax) or "cudnn" (jax.nn.dot_product_attention, which uses
      the fused cuDNN kernel on GPU when dtypes and shapes allow and falls back to XLA otherwise).
  Returns:
    `[S, L, heads, head_dim]`; rows at padded slots are finite but meaningless: drop them.
  """
  scale = q.shape[-1] ** -0.5
  if impl == "cudnn":
    # Only keys are masked: padded query rows then stay finite (no all-masked softmax rows whose
    # NaNs could leak into gradients); they are dropped by the caller anyway.
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=lengths if padded else None,
        implementation=None)
  logits = jnp.einsum("sqhd,skhd->shqk", q, k, preferred_element_type=jnp.float32) * scale
  if padded:
    key_valid = jnp.arange(q.shape[1])[None, :] < lengths[:, None]  # [S, L]
    logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("shqk,skhd->sqhd", weights, v)


class VisionAttention(nn.Module):
  """Fused-qkv multi-head attention with 2-D RoPE, restricted to segments (frames or windows)."""

  num_heads: int
  attention_impl: str = "xla"
  padded: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, gather, lengths, scatter) -> jnp.ndarray:
    """x `[N, E]`; cos/sin `[N, head_dim]`; gather/lengths/scatter: a `SegmentTable`'s arrays."""
    n, dim = x.shape
    head_dim = dim // self.num_heads
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    # HF's qkv output is [3, heads, head_dim] flattened; keep that layout so weights copy as is.
    qkv = dense(3 * dim, ("embed", "heads"), name="qkv")(x).reshape(n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = vision_rope.apply_rotary(q, cos, sin)
    k = vision_rope.apply_rotary(k, cos, sin)

    segments = lambda t: _constrain(
        jnp.take(t, gather, axis=0),
        "activation_batch", "activation_length", "activation_heads", "activation_kv")
    out = segment_attention(
        segments(q), segments(k), segments(v), lengths,
        padded=self.padded, impl=self.attention_impl)  # [S, L, heads, head_dim]
    out = jnp.take(out.reshape(-1, self.num_heads, head_dim), scatter, axis=0).reshape(n, dim)
    out = _constrain(out, "activation_length", "activation_embed")
    return dense(dim, ("heads", "embed"), name="proj")(out)


class VisionMLP(nn.Module):
  """SwiGLU `down(act(gate(x)) * up(x))` (Qwen2.5-VL) or `fc2(act(fc1(x)))` (Qwen2-VL)."""

  kind: str
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    act = _activation(self.hidden_act)
    dim, hidden = x.shape[-1], self.intermediate_size
    if self.kind == "qwen2_5_vl":
      h = act(dense(hidden, ("embed", "mlp"), name="gate_proj")(x))
      h = h * dense(hidden, ("embed", "mlp"), name="up_proj")(x)
      h = _constrain(h, "activation_length", "activation_mlp")
      return dense(dim, ("mlp", "embed"), name="down_proj")(h)
    h = act(dense(hidden, ("embed", "mlp"), name="fc1")(x))
    h = _constrain(h, "activation_length", "activation_mlp")
    return dense(dim, ("mlp", "embed"), name="fc2")(h)


class VisionBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  cfg: VisionConfig
  attention_impl: str = "xla"
  padded: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, gather, lengths, scatter) -> jnp.ndarray:
    cfg = self.cfg
    norm = functools.partial(_norm, cfg.kind, cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    attn = VisionAttention(
        cfg.num_heads, self.attention_impl, self.padded, self.dtype, self.param_dtype, name="attn")
    mlp = VisionMLP(
        cfg.kind, cfg.intermediate_size, cfg.hidden_act, self.dtype, self.param_dtype, name="mlp")
    x = x + attn(norm(name="norm1")(x), cos, sin, gather, lengths, scatter)
    x = _constrain(x, "activation_length", "activation_embed")
    x = x + mlp(norm(name="norm2")(x))
    return _constrain(x, "activation_length", "activation_embed")


class PatchEmbed(nn.Module):
  """The reference's Conv3d with kernel = stride = (T, P, P) and no bias, on already-cut patches.

  Each row of pixel_values is one patch flattened as (channel, time, row, col), the order of the
  Conv3d weight's input dims, so the convolution is one matmul.
  """

  hidden_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
    proj = _dense(self.hidden_size, (None, "embed"), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype, use_bias=False)
    return proj(pixel_values.astype(self.dtype))


class PatchMerger(nn.Module):
  """norm, then each m*m block of consecutive patches -> one token: Linear, GELU (erf), Linear."""

  kind: str
  out_hidden_size: int
  spatial_merge_size: int
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = _norm(self.kind, self.eps, "ln_q", self.dtype, self.param_dtype)(x)
    merged = self.spatial_merge_size**2 * x.shape[-1]
    x = x.reshape(-1, merged)
    # Input dim left unsharded: a logical name may appear only once per array.
    x = jax.nn.gelu(dense(merged, (None, "mlp"), name="mlp_0")(x), approximate=False)
    x = _constrain(x, "activation_length", "activation_mlp")
    x = dense(self.out_hidden_size, ("mlp", "embed"), name="mlp_2")(x)
    return _constrain(x, "activation_length", "activation_embed")


class VisionTower(nn.Module):
  """Qwen2-VL / Qwen2.5-VL vision encoder with its patch merger.

  Attributes:
    cfg: the tower's hyper-parameters.
    dtype: compute dtype name ('float32' or 'bfloat16').
    param_dtype: parameter storage dtype name.
    remat: rematerialise each block in the backward pass.
    attention_impl: 'xla' (einsum softmax) or 'cudnn' (jax.nn.dot_product_attention).
  """

  cfg: VisionConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jnp.ndarray, grid_thw) -> jnp.ndarray:
    """Encodes the images of one call.

    Args:
      pixel_values: `[num_patches, in_channels * temporal_patch_size * patch_size**2]`, as the HF
        Qwen2-VL image processor emits them (all images concatenated).
      grid_thw: static tuple of (t, h, w) per image, in patches (the processor's `image_grid_thw`).
    Returns:
      `[num_patches // spatial_merge_size**2, out_hidden_size]` merged features, in the order of
      transformers (image by image, merge block by merge block).
    """
    cfg = self.cfg
    check_config(cfg, self.attention_impl)
    dtype, param_dtype = _dtype(self.dtype), _dtype(self.param_dtype)
    grid = vision_rope.normalize_grid(grid_thw)
    vision_rope.check_grid(grid, cfg.spatial_merge_size)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    expected = (vision_rope.num_patches(grid), patch_dim)
    if tuple(pixel_values.shape) != expected:
      raise ValueError(
          f"pixel_values has shape {tuple(pixel_values.shape)}, expected {expected} for "
          f"grid_thw={grid} (sum of t*h*w patches, in_channels*temporal_patch_size*patch_size^2 "
          "values per patch). Pass the processor's pixel_values with its image_grid_thw.")

    x = PatchEmbed(cfg.hidden_size, dtype, param_dtype, name="patch_embed")(pixel_values)
    x = _constrain(x, "activation_length", "activation_embed")
    positions = vision_rope.patch_positions(grid, cfg.spatial_merge_size)
    cos, sin = vision_rope.rotary_cos_sin(
        jnp.asarray(positions), cfg.hidden_size // cfg.num_heads, cfg.rope_theta)

    tables = {False: vision_rope.full_attention_table(grid)}
    if cfg.kind == "qwen2_5_vl":
      tables[True] = vision_rope.window_attention_table(
          grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    block_cls = nn.remat(VisionBlock) if self.remat else VisionBlock
    for i in range(cfg.depth):
      table = tables[vision_rope.windowed_block(i, cfg.kind, cfg.fullatt_block_indexes)]
      block = block_cls(cfg, self.attention_impl, table.is_padded, dtype, param_dtype,
                        name=f"blocks_{i}")
      x = block(x, cos, sin, jnp.asarray(table.gather), jnp.asarray(table.lengths),
                jnp.asarray(table.scatter))

    merger = PatchMerger(cfg.kind, cfg.out_hidden_size, cfg.spatial_merge_size, cfg.norm_eps,
                         dtype, param_dtype, name="merger")
    return merger(x)


def check_config(cfg: VisionConfig, attention_impl: str) -> None:
  if cfg.kind not in KINDS:
    raise ValueError(f"VisionConfig.kind={cfg.kind!r}: expected one of {KINDS}.")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={attention_impl!r}: expected one of {ATTENTION_IMPLS}.")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(
        f"vision hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}.")
  bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
  if cfg.kind == "qwen2_5_vl" and bad:
    raise ValueError(f"fullatt_block_indexes {bad} are outside the {cfg.depth} blocks.")
