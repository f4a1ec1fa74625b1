"""The text decoder alone: 1-D RoPE Qwen2 / LLaMA against transformers, the KV cache, remat,
the fused attention path, bf16, and M-RoPE's reduction to 1-D RoPE on text."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import hf_io, rope
from jigsaw_jax.models.config import TextConfig
from tests.models.test_mllm import randomize

TOL = 1e-4


def _hf_and_ours(arch: str):
  """A random transformers causal LM and the same weights in our decoder."""
  common = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_theta=10000.0)
  if arch == "qwen2":  # q/k/v biases, untied head
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common,
                                                                tie_word_embeddings=False))
    cfg = TextConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     rope_theta=10000.0, mrope_section=None, qkv_bias=True,
                     tie_word_embeddings=False)
  else:  # LLaMA (SmolLM2's architecture): no biases, tied embeddings
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common,
                                                                tie_word_embeddings=True))
    cfg = TextConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     rope_theta=10000.0, mrope_section=None, qkv_bias=False,
                     tie_word_embeddings=True)
  hf = randomize(hf.eval())
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  decoder = decoder_lib.TextDecoder(cfg)
  abstract = nn.unbox(jax.eval_shape(decoder.init, jax.random.key(0),
                                     jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                                     jnp.ones((1, 2))))["params"]
  params = {}
  for spec in hf_io.decoder_weight_specs(cfg, prefix=()):
    target = hf_io._get_path(abstract, spec.path)
    hf_io._set_path(params, spec.path, hf_io.hf_to_ours(spec.kind, state[spec.hf_name],
                                                        target.shape))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  return hf, cfg, decoder, {"params": params}


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, 120, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, :4] = 0  # left padding
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return ids, mask, positions


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request):
  return _hf_and_ours(request.param)


def test_logits_match_transformers(model):
  hf, _, decoder, params = model
  ids, mask, positions = _batch()
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits.numpy()
  out = decoder.apply(params, jnp.asarray(ids), positions, mask)
  real = mask.astype(bool)
  assert np.abs(np.asarray(out.logits) - ref)[real].max() < TOL
  assert np.abs(ref).max() > 1.0


def test_kv_cache_prefill_and_decode_match_full_forward(model):
  _, cfg, decoder, params = model
  ids, mask, positions = _batch()
  full = decoder.apply(params, jnp.asarray(ids), positions, mask).logits
  apply = jax.jit(decoder.apply)
  cache = decoder_lib.init_cache(cfg, 2, 12)
  out = apply(params, ids[:, :6], positions[:, :6], mask[:, :6], cache)
  real = mask[:, :6].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full[:, :6])[real],
                             atol=TOL)
  cache = out.cache
  for t in range(6, 9):
    # The next position of each row is the number of real tokens it holds.
    np.testing.assert_array_equal(decoder_lib.cache_lengths(cache), positions[:, t])
    out = apply(params, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=TOL)
    cache = out.cache
  assert int(cache["index"]) == 9


def test_embeddings_input_equals_ids_input(model):
  _, _, decoder, params = model
  ids, mask, positions = _batch()
  embeds = decoder.apply(params, jnp.asarray(ids), method=decoder_lib.TextDecoder.embed)
  a = decoder.apply(params, jnp.asarray(ids), positions, mask, return_hidden=True)
  b = decoder.apply(params, embeds, positions, mask, return_hidden=True)
  np.testing.assert_array_equal(a.logits, b.logits)
  assert a.hidden.shape == (2, 9, 64)
  last = decoder.apply(params, embeds, positions, mask, last_logits_only=True)
  np.testing.assert_allclose(last.logits[:, 0], a.logits[:, -1], atol=1e-6)


def test_remat_and_fused_attention_give_the_same_function(model):
  _, cfg, decoder, params = model
  ids, mask, positions = _batch()

  def loss(p, module):
    logits = module.apply(p, jnp.asarray(ids), positions, mask).logits
    return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0))

  base_value, base_grad = jax.value_and_grad(loss)(params, decoder)
  for variant in (decoder_lib.TextDecoder(cfg, remat=True),
                  decoder_lib.TextDecoder(cfg, attention_impl="cudnn")):
    value, grad = jax.value_and_grad(loss)(params, variant)
    np.testing.assert_allclose(value, base_value, rtol=1e-5)
    # Gradients here are O(1e3): compare relative to each tensor's scale.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, atol=1e-5 * float(np.abs(b).max()), rtol=0), grad, base_grad)


def test_bfloat16_compute_stays_close_to_float32(model):
  _, cfg, decoder, params = model
  ids, mask, positions = _batch()
  ref = decoder.apply(params, jnp.asarray(ids), positions, mask).logits
  bf16 = decoder_lib.TextDecoder(cfg, dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = bf16.apply(params16, jnp.asarray(ids), positions, mask).logits
  assert out.dtype == jnp.float32  # logits accumulate in float32 whatever the compute dtype
  real = mask.astype(bool)
  err = np.abs(np.asarray(out) - np.asarray(ref))[real]
  assert np.isfinite(err).all() and err.max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_mrope_on_text_equals_1d_rope():
  """Text tokens carry one id on all three axes: M-RoPE must then be plain RoPE."""
  pos = jnp.asarray(np.random.RandomState(0).randint(0, 500, (2, 7)))
  cos1, sin1 = rope.rope_cos_sin(pos, 32, 1e6, None)
  cos3, sin3 = rope.rope_cos_sin(jnp.stack([pos] * 3), 32, 1e6, (4, 6, 6))
  np.testing.assert_array_equal(cos1, cos3)
  np.testing.assert_array_equal(sin1, sin3)


def test_mrope_sections_take_their_own_axis():
  t, h, w = (jnp.full((1, 1), v) for v in (3, 5, 7))
  cos, _ = rope.rope_cos_sin(jnp.stack([t, h, w]), 16, 100.0, (2, 3, 3))
  inv = np.asarray(rope.inverse_frequencies(16, 100.0))
  expected = np.cos(np.array([3] * 2 + [5] * 3 + [7] * 3) * inv)
  np.testing.assert_allclose(cos[0, 0, :8], expected, atol=1e-6)
  np.testing.assert_allclose(cos[0, 0, 8:], expected, atol=1e-6)


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="must sum"):
    rope.rope_cos_sin(jnp.zeros((3, 1, 1), jnp.int32), 16, 1e4, (2, 2, 2))
  cfg = TextConfig(vocab_size=10, hidden_size=16, intermediate_size=16, num_layers=1,
                   num_heads=3, num_kv_heads=2, head_dim=4, mrope_section=None)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    decoder_lib.TextDecoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                      jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))


def test_tap_and_first_layer_split_the_stack_exactly():
  """Running the first k layers, then the rest from the tapped stream, equals one pass."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jigsaw_jax.models.config import TextConfig
  from jigsaw_jax.models.decoder import TextDecoder
  cfg = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, mrope_section=None, qkv_bias=False)
  model = TextDecoder(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  mask = jnp.ones((2, 7), jnp.int32)
  params = model.init(jax.random.key(0), ids, pos, mask)
  full = model.apply(params, ids, pos, mask, tap_layer=2)
  rest = model.apply(params, full.tapped, pos, mask, first_layer=2)
  np.testing.assert_allclose(rest.logits, full.logits, atol=1e-6)
  assert model.apply(params, ids, pos, mask, tap_layer=3).tapped.shape == (2, 7, 32)
