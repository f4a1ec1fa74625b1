"""Building blocks of the text decoder: RMSNorm, SwiGLU MLP and grouped-query attention.

Every parameter carries logical axis names so that a mesh rule table (data, not code) decides how it
is sharded; activations get logical constraints that are no-ops until such rules are in context.
Parameter names follow the transformers module names (q_proj, gate_proj, input_layernorm, ...) so
the HF name map in `hf_io.py` reads one-to-one.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import rope

Array = jax.Array
# One layer's slice of the KV cache: {'k': [B, K, S, D], 'v': [B, K, S, D]}. Head-major, so the
# attention einsums read it as stored: a [B, S, K, D] cache is transposed whole by XLA at every
# decode step (measured: most of the decode time on CPU).
LayerCache = Dict[str, Array]
# One layer's view of a read-only prefix shared by groups of rows: k, v [P, K, Sp, D], mask [P, Sp].
Prefix = Tuple[Array, Array, Array]

_INIT_STD = 0.02  # The reference's initializer_range; only matters for random (test) weights.


def as_dtype(name: Any) -> jnp.dtype:
  """'float32' / 'bfloat16' (config strings) or a dtype -> a jnp dtype."""
  return jnp.dtype(name)


def constrain(x: Array, names: Tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


def partitioned(init, names: Tuple[str, ...]):
  return nn.with_logical_partitioning(init, names)


class Projection(nn.Module):
  """y = x . kernel (+ bias), contracting the last `contract` axes of x into `features`.

  Written out instead of flax's DenseGeneral because that initialises a flattened kernel and
  reshapes it, and under a mesh its rank-2 intermediate meets the rank-3 logical-partitioning
  constraint of the final kernel. Parameter names and shapes are DenseGeneral's, so checkpoints
  and the HF name map are unaffected.

  `adapter_mode` ('lora' or 'experts', with `adapter` the AdapterConfig) adds a trainable delta
  from the 'adapter' collection (jigsaw_jax/models/adapters), skipped when the call passes
  `adapters_enabled=False`.
  """

  features: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]  # logical names of the kernel: input axes, then feature axes
  contract: int = 1
  use_bias: bool = False
  bias_axes: Tuple[str, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  adapter: Any = None  # AdapterConfig
  adapter_mode: Optional[str] = None  # None | 'lora' | 'experts'

  @nn.compact
  def __call__(self, x: Array, adapters_enabled: bool = True) -> Array:
    in_shape = x.shape[-self.contract:]
    kernel = self.param("kernel", partitioned(nn.initializers.normal(_INIT_STD), self.kernel_axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    letters = "abcdefgh"
    ins, outs = letters[:self.contract], letters[self.contract:self.contract + len(self.features)]
    y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x.astype(self.dtype),
                   kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_axes),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.adapter_mode is not None and adapters_enabled:
      y = y + self._adapter_delta(x)
    return y

  def _adapter_delta(self, x: Array) -> Array:
    axes = dict(features=tuple(self.features), in_axes=tuple(self.kernel_axes[:self.contract]),
                out_axes=tuple(self.kernel_axes[self.contract:]), dtype=self.dtype,
                param_dtype=self.param_dtype)
    if self.adapter_mode == "lora":
      a = self.adapter
      return adapters_lib.lora.LoRA(rank=a.rank, alpha=a.alpha, dropout_rate=a.dropout,
                                    name="lora", **axes)(x)
    if self.adapter_mode == "experts":
      return adapters_lib.moe_lora.ProjectionExperts(cfg=self.adapter, name="experts", **axes)(x)
    raise ValueError(f"adapter_mode must be None, 'lora' or 'experts', got {self.adapter_mode!r}.")


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised in float32 like the reference, then cast back to `dtype`."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * xf.astype(self.dtype)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(act(gate(x)) * up(x)).

  With an expert adapter (MoE-LoRA, GraphMoE) the block is the adapter's `moe` module, which
  runs these frozen projections inside its routed experts; with LoRA, each targeted projection
  carries its own.
  """

  hidden_size: int
  intermediate_size: int
  activation: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  adapter: Any = None  # AdapterConfig

  @nn.compact
  def __call__(self, x: Array, adapters_enabled: bool = True) -> Array:
    def dense(features, names, name):
      mode = adapters_lib.projection_adapter(self.adapter, self.path + (name,), in_ffn=True)
      return Projection((features,), names, dtype=self.dtype, param_dtype=self.param_dtype,
                        adapter=self.adapter, adapter_mode=mode, name=name)

    act = {"silu": nn.silu, "gelu": nn.gelu}[self.activation]
    gate_proj = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")
    up_proj = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")
    down_proj = dense(self.hidden_size, ("mlp", "embed"), "down_proj")
    experts = adapters_lib.ffn_expert_targets(self.adapter, self.path)
    if experts and adapters_enabled:
      block = adapters_lib.ffn_module(self.adapter)(
          self.hidden_size, self.intermediate_size, experts, self.adapter, self.dtype,
          self.param_dtype, name="moe")
      return block(x, gate_proj, up_proj, down_proj, act)
    gate = gate_proj(x, adapters_enabled)
    up = up_proj(x, adapters_enabled)
    h = constrain(act(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return down_proj(h, adapters_enabled)


def attention_weights_xla(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """Grouped-query attention with an explicit softmax in float32.

  q [B, T, H, D], k/v [B, K, S, D] with H a multiple of K, mask bool [B, T, S] -> [B, T, H, D].
  Masked scores take the dtype's most negative finite value (not -inf), so a row with no visible
  key (a left-padding query) averages uniformly instead of producing NaN that would leak through
  0 * NaN into later layers.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def attention_weights_fused(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """The same attention through `jax.nn.dot_product_attention`.

  On a GPU with half-precision inputs this asks for the cuDNN fused kernel; elsewhere (CPU tests,
  float32) jax's own XLA implementation runs, so the option is always safe to set.
  """
  fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # to [B, S, K, D]
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                      implementation="cudnn" if fused else None)


ATTENTION_IMPLS = {"xla": attention_weights_xla, "cudnn": attention_weights_fused}


def attention_with_prefix(q: Array, k: Array, v: Array, mask: Array, prefix: Prefix,
                          scale: float) -> Array:
  """Grouped-query attention over a prefix shared by groups of rows, then each row's own keys.

  q [B, T, H, D]; own k/v [B, K, S, D] under mask bool [B, T, S]; prefix (k, v, mask) with k/v
  [P, K, Sp, D] and mask bool [P, Sp], B = P * G: rows p*G ... p*G+G-1 see all valid slots of
  prefix row p before their own. Equal to `attention_weights_xla` over the concatenated keys.

  Why: a decode step is bound by streaming the KV cache through memory, and the G samples of a
  prompt (GRPO) would hold G copies of the prompt's keys. Reading them once per group, as one
  [G*T*H/K, D] x [D, Sp] matrix product, is most of the sampler's speed on CPU. The two halves
  are softmaxed separately and merged by their maxima (as flash attention merges blocks), so
  nothing of size [B, ..., Sp] is built. Queries and probabilities are laid out [rows, K, M, .]
  because for those operand orders XLA:CPU calls its fast matmul, where the orders of
  `attention_weights_xla` (fine for prefill) ran a generic dot loop, ~3x slower, at one query.
  """
  pk, pv, pmask = prefix
  b, t, h, d = q.shape
  p, kv_heads, sp = pk.shape[:3]
  g, group = h // kv_heads, b // p
  m = g * t  # queries per row and KV head
  low = jnp.finfo(jnp.float32).min  # not -inf: see attention_weights_xla

  def shared_layout(x):  # [B, K, M, ...] -> [P, K, G*M, ...]: a group's queries side by side
    x = x.reshape((p, group, kv_heads, m) + x.shape[3:]).swapaxes(1, 2)
    return x.reshape((p, kv_heads, group * m) + x.shape[4:])

  def row_layout(x):  # the inverse
    x = x.reshape((p, kv_heads, group, m) + x.shape[3:]).swapaxes(1, 2)
    return x.reshape((b, kv_heads, m) + x.shape[4:])

  q_rows = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, m, d)
  # Written from q's [B, T, K, G, D] so that XLA copies the (small) queries to [B, K, D, M] and
  # runs [S, D] x [D, M]; from [B, K, M, D] it folds any transpose into a [M, D] x [S, D]^T
  # product, ~3x slower on CPU for so narrow an M.
  own = jnp.einsum("btkgd,bksd->bkgts", q.reshape(b, t, kv_heads, g, d), k,
                   preferred_element_type=jnp.float32).reshape(b, kv_heads, m, -1) * scale
  own_visible = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1]))
  own = jnp.where(own_visible.reshape(b, 1, m, -1), own, low)
  shared = jnp.einsum("pkmd,pksd->pkms", shared_layout(q_rows), pk,
                      preferred_element_type=jnp.float32) * scale
  shared = jnp.where(pmask[:, None, None], shared, low)
  top = jnp.maximum(own.max(-1), row_layout(shared.max(-1)))  # [B, K, M]
  own = jnp.exp(own - top[..., None])
  shared = jnp.exp(shared - shared_layout(top)[..., None])
  total = own.sum(-1) + row_layout(shared.sum(-1))
  out = (jnp.einsum("bkms,bksd->bkmd", own.astype(v.dtype), v, preferred_element_type=jnp.float32)
         + row_layout(jnp.einsum("pkms,pksd->pkmd", shared.astype(pv.dtype), pv,
                                 preferred_element_type=jnp.float32))) / total[..., None]
  out = out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, t, h, d).astype(q.dtype)


class Attention(nn.Module):
  """Causal GQA self-attention with rotary embeddings and an optional preallocated KV cache."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  adapter: Any = None  # AdapterConfig: LoRA / experts on the projections its `targets` match
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(
      self,
      x: Array,  # [B, T, E]
      cos: Array,  # [B, T, D] float32
      sin: Array,  # [B, T, D] float32
      mask: Array,  # bool [B, T, S]: query t may see key slot s
      kv_cache: Optional[LayerCache] = None,  # {'k','v'}: [B, K, S, D]
      cache_index: Optional[Array] = None,  # int32 scalar: slot of x[:, 0] in the cache
      adapters_enabled: bool = True,
      prefix: Optional[Prefix] = None,  # keys every group of B // P rows sees first
  ) -> Tuple[Array, Optional[LayerCache]]:
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {sorted(ATTENTION_IMPLS)}, "
                       f"got {self.attention_impl!r}.")

    def adapted(name):
      return dict(adapter=self.adapter, adapter_mode=adapters_lib.projection_adapter(
          self.adapter, self.path + (name,), in_ffn=False))

    def proj(heads, head_axis, name):
      return Projection(
          (heads, self.head_dim), ("embed", head_axis, "head_dim"), use_bias=self.qkv_bias,
          bias_axes=(head_axis, "head_dim"), dtype=self.dtype, param_dtype=self.param_dtype,
          name=name, **adapted(name))(x, adapters_enabled)

    q = proj(self.num_heads, "q_heads", "q_proj")  # [B, T, H, D]
    k = proj(self.num_kv_heads, "kv_heads", "k_proj")  # [B, T, K, D]
    v = proj(self.num_kv_heads, "kv_heads", "v_proj")
    if self.qk_norm:
      q = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
    q = constrain(rope.apply_rope(q, cos, sin), ("activation_batch", "activation_length",
                                                 "activation_heads", "activation_head_dim"))
    k = rope.apply_rope(k, cos, sin).transpose(0, 2, 1, 3)  # [B, K, T, D]
    v = v.transpose(0, 2, 1, 3)

    new_cache = None
    if kv_cache is not None:
      start = (0, 0, cache_index, 0)
      k_all = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
      v_all = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
      new_cache = {"k": k_all, "v": v_all}
      k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)

    if prefix is None:
      out = ATTENTION_IMPLS[self.attention_impl](q, k, v, mask, self.head_dim ** -0.5)
    else:  # Decoding only (the sampler), where cuDNN's fused kernel has nothing to fuse.
      out = attention_with_prefix(q, k, v, mask, prefix, self.head_dim ** -0.5)
    out = Projection((x.shape[-1],), ("q_heads", "head_dim", "embed"), contract=2,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="o_proj",
                     **adapted("o_proj"))(out, adapters_enabled)
    return out, new_cache
