"""The text decoder: Qwen2 (GQA, q/k/v bias, M-RoPE), Qwen3 (QK-norm) and LLaMA-style models.

One module serves both a full forward pass (training, scoring) and incremental decoding over a
preallocated KV cache (the sampler). Both run the same code: without a cache the keys are the
current tokens; with one, the new keys are written at `cache['index']` and every query sees the
cache slots up to its own.

    decoder = TextDecoder(cfg)
    params = decoder.init(rng, input_ids, positions, attn_mask)  # init from ids: creates the embedding
    out = decoder.apply(params, input_ids, positions, attn_mask)           # full forward
    out = decoder.apply(params, embeds, positions, attn_mask)              # or from embeddings
    cache = init_cache(cfg, batch_size, max_len)
    out = decoder.apply(params, embeds, positions, attn_mask, cache)       # prefill
    out = decoder.apply(params, next_embeds, next_positions, ones, out.cache)  # decode step

`attn_mask` marks real tokens (1) and padding (0). Prompts are left-padded, so all rows write the
same cache slots and only the key mask differs per row.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.models import layers
from jigsaw_jax.models import rope
from jigsaw_jax.models.config import TextConfig

Array = jax.Array
# {'layers': [{'k': [B, K, S, D], 'v': [B, K, S, D]}, ...], 'mask': bool [B, S], 'index': int32 []}
# and optionally 'prefix': {'layers': [{'k': [P, K, Sp, D], 'v': ...}, ...], 'mask': bool [P, Sp]},
# read-only keys that rows p*G ... p*G+G-1 (G = B // P) see before their own slots: the sampler's
# prompt cache, shared by the G samples of a prompt instead of copied G times (see
# `layers.attention_with_prefix`). `init_cache` makes the plain form.
Cache = Dict[str, Any]


class DecoderOutput(NamedTuple):
  logits: Optional[Array]  # float32 [B, L, V] (or [B, 1, V] with last_logits_only)
  hidden: Optional[Array]  # [B, L, E]: final hidden states after the last norm, on request
  cache: Optional[Cache]  # the updated cache when one was passed in
  # [B, L, E]: the residual stream entering layer `tap_layer` (before its norm), on request.
  tapped: Optional[Array] = None


def init_cache(cfg: TextConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache: all slots masked out, write index 0."""
  shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)  # head-major, see layers.py
  return {
      "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(cfg.num_layers)],
      "mask": jnp.zeros((batch_size, max_len), jnp.bool_),
      "index": jnp.zeros((), jnp.int32),
  }


def cache_lengths(cache: Cache) -> Array:
  """Real (non-padding) tokens held per row, int32 [B]. The next 1-D position of each row."""
  lengths = jnp.sum(cache["mask"], axis=-1, dtype=jnp.int32)
  if "prefix" in cache:
    shared = jnp.sum(cache["prefix"]["mask"], axis=-1, dtype=jnp.int32)
    lengths = lengths + jnp.repeat(shared, lengths.shape[0] // shared.shape[0])
  return lengths


def visibility_mask(attn_mask: Array, cache: Optional[Cache]) -> tuple[Array, Optional[Array]]:
  """bool [B, T, S] visibility (causal and not padding), plus the cache's updated key mask."""
  valid = attn_mask.astype(jnp.bool_)
  t = valid.shape[1]
  if cache is None:
    key_valid, start, s = valid, 0, t
  else:
    start = cache["index"]
    key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, start))
    s = key_valid.shape[1]
  query_slot = start + jnp.arange(t)[:, None]
  causal = jnp.arange(s)[None, :] <= query_slot  # [T, S]
  return causal[None] & key_valid[:, None, :], (None if cache is None else key_valid)


class DecoderLayer(nn.Module):
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  adapter: Any = None  # AdapterConfig (jigsaw_jax/models/adapters) or None

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None, adapters_enabled=True,
               prefix=None, last_only=False):
    """`last_only` returns the last position alone, skipping the output projection and MLP of
    the others (their keys and values still reach the cache)."""
    cfg = self.cfg
    norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
    h, kv_cache = layers.Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias, self.attention_impl,
        self.dtype, self.param_dtype, self.adapter, cfg.qk_norm, cfg.rms_norm_eps,
        name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, kv_cache, cache_index, adapters_enabled,
            prefix)
    if last_only:
      x, h = x[:, -1:], h[:, -1:]
    x = x + h
    x = x + layers.MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype,
                       self.param_dtype, self.adapter, name="mlp")(
                           norm("post_attention_layernorm")(x), adapters_enabled)
    x = layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, kv_cache


class TextDecoder(nn.Module):
  """Token embedding, decoder layers, final norm and LM head.

  Attributes:
    cfg: the decoder's shape.
    dtype / param_dtype: compute and storage dtypes ('float32', 'bfloat16').
    remat: rematerialise each layer in the backward pass.
    attention_impl: 'xla' (einsum, softmax in float32) or 'cudnn' (jax.nn.dot_product_attention).
    adapter: an AdapterConfig: trainable LoRA / MoE-LoRA / GraphMoE in the 'adapter' collection,
      applied unless a call passes `adapters_enabled=False` (jigsaw_jax/models/adapters).
  """

  cfg: TextConfig
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: bool = False
  attention_impl: str = "xla"
  adapter: Any = None

  def setup(self):
    cfg = self.cfg
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads "
                       f"({cfg.num_kv_heads}).")
    dtype, param_dtype = layers.as_dtype(self.dtype), layers.as_dtype(self.param_dtype)
    init = nn.initializers.normal(layers._INIT_STD)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=layers.partitioned(init, ("vocab", "embed")))
    # adapters_enabled and last_only (arguments 7 and 9, counting self) are Python bools: static
    # under remat.
    layer_cls = nn.remat(DecoderLayer, static_argnums=(7, 9)) if self.remat else DecoderLayer
    self.layers = [
        layer_cls(cfg, dtype, param_dtype, self.attention_impl, self.adapter, name=f"layers_{i}")
        for i in range(cfg.num_layers)]
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype, param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", layers.partitioned(init, ("embed", "vocab")),
                                (cfg.hidden_size, cfg.vocab_size), param_dtype)

  def embed(self, input_ids: Array) -> Array:
    """int [B, L] -> [B, L, E] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def logits(self, hidden: Array) -> Array:
    """[B, L, E] -> float32 [B, L, V], accumulating in float32 whatever the compute dtype."""
    dtype = layers.as_dtype(self.dtype)
    if self.cfg.tie_word_embeddings:
      w = self.embed_tokens.embedding.astype(dtype)
      out = jnp.einsum("ble,ve->blv", hidden, w, preferred_element_type=jnp.float32)
    else:
      out = jnp.einsum("ble,ev->blv", hidden, self.lm_head.astype(dtype),
                       preferred_element_type=jnp.float32)
    return layers.constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(
      self,
      inputs: Array,  # int token ids [B, T], or embeddings [B, T, E]
      positions: Array,  # int [B, T], or [3, B, T] for M-RoPE
      attn_mask: Array,  # [B, T]: 1 real token, 0 padding
      cache: Optional[Cache] = None,
      *,
      return_hidden: bool = False,
      return_logits: bool = True,
      last_logits_only: bool = False,
      tap_layer: Optional[int] = None,
      first_layer: int = 0,
      adapters_enabled: bool = True,
      deepstack: Optional[Sequence[Array]] = None,
  ) -> DecoderOutput:
    """Runs layers `first_layer`... to the end (a later start takes `inputs` as that layer's input
    residual stream: FastMem reruns only the last layers on a cached trunk); `tap_layer` also
    returns the residual stream entering that layer (num_layers: after the last one, before the
    final norm), which Proxy-RLHF reads. `adapters_enabled=False` runs the base model alone (the
    KL reference of adapter training) with the same variables. `deepstack[i]` ([B, T, E], zero
    away from image tokens) is added to the output of layer i: Qwen3-VL's DeepStack."""
    cfg = self.cfg
    x = self.embed(inputs) if jnp.issubdtype(inputs.dtype, jnp.integer) else inputs
    x = layers.constrain(x.astype(layers.as_dtype(self.dtype)),
                         ("activation_batch", "activation_length", "activation_embed"))
    if cfg.mrope_section is None and positions.ndim == 3:
      positions = positions[0]  # A 1-D model given M-RoPE ids of text: all three axes agree.
    cos, sin = rope.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                 cfg.mrope_interleaved)
    mask, key_valid = visibility_mask(attn_mask, cache)
    index = None if cache is None else cache["index"]
    prefix = None if cache is None else cache.get("prefix")
    # Only the last position leaves the last layer when nothing else reads the others: in a
    # prefill that skips a layer's MLP for all prompt tokens but one.
    trim = last_logits_only and not return_hidden and tap_layer != len(self.layers)
    new_layers: List[layers.LayerCache] = []
    tapped = None
    for i, layer in enumerate(self.layers):
      if i == tap_layer:
        tapped = x
      if i < first_layer:
        new_layers.append(None if cache is None else cache["layers"][i])
        continue
      shared = None if prefix is None else (prefix["layers"][i]["k"], prefix["layers"][i]["v"],
                                            prefix["mask"])
      last_only = trim and i == len(self.layers) - 1
      x, kv = layer(x, cos, sin, mask, None if cache is None else cache["layers"][i], index,
                    adapters_enabled, shared, last_only)
      if deepstack is not None and i < len(deepstack):
        x = x + (deepstack[i][:, -1:] if last_only else deepstack[i]).astype(x.dtype)
      new_layers.append(kv)
    if tap_layer == len(self.layers):
      tapped = x
    hidden = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = {"layers": new_layers, "mask": key_valid,
                   "index": cache["index"] + jnp.int32(inputs.shape[1])}
      if prefix is not None:
        new_cache["prefix"] = prefix
    logits = None
    if return_logits:
      logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
    return DecoderOutput(logits, hidden if return_hidden else None, new_cache, tapped)
