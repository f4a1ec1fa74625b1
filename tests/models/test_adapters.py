"""Adapters on the text decoder: LoRA, MoE-LoRA and GraphMoE (jigsaw_jax/models/adapters)."""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jigsaw_jax.models import adapters, decoder as decoder_lib, mllm, presets
from jigsaw_jax.models.adapters import moe_lora
from jigsaw_jax.models.config import TextConfig

TEXT = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mrope_section=None, qkv_bias=True,
                  tie_word_embeddings=True)
KINDS = ("lora", "moe_lora", "graph_moe")


def _inputs(batch=2, length=6, seed=0):
  ids = np.random.RandomState(seed).randint(0, TEXT.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones_like(ids)
  positions = np.broadcast_to(np.arange(length), ids.shape).astype(np.int32)
  return ids, positions, mask


@pytest.fixture(scope="module")
def base():
  ids, positions, mask = _inputs()
  return nn.unbox(decoder_lib.TextDecoder(TEXT).init(jax.random.key(0), ids, positions, mask))


def _adapted(adapter, base, seed=1, randomize=False):
  """(decoder with `adapter`, {'params': base, 'adapter': ...}); `randomize` makes every
  zero-initialised adapter tensor random so that the adapters change the output."""
  model = decoder_lib.TextDecoder(TEXT, adapter=adapter)
  ids, positions, mask = _inputs()
  init = nn.unbox(model.init(jax.random.key(seed), ids, positions, mask))
  assert set(init) == {"params", "adapter"}  # no 'losses' collection left over from init
  adapter_vars = {"adapter": init["adapter"]}
  if randomize:
    leaves, tree = jax.tree.flatten(adapter_vars)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    adapter_vars = jax.tree.unflatten(tree, [
        x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, adapters.join(adapter_vars, base)


def _logits(model, variables, **kw):
  return np.asarray(model.apply(variables, *_inputs(), **kw).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_adapters_leave_outputs_unchanged(base, kind):
  reference = _logits(decoder_lib.TextDecoder(TEXT), base)
  for extra in ({}, dict(attention_experts=True), dict(combine="gated_residual", steps=3),
                dict(combine="add", expert_input="refined")):
    model, variables = _adapted(adapters.AdapterConfig(kind=kind, **extra), base)
    np.testing.assert_array_equal(_logits(model, variables), reference)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_enabled_false_is_the_base(base, kind):
  reference = _logits(decoder_lib.TextDecoder(TEXT), base)
  model, variables = _adapted(adapters.AdapterConfig(kind=kind), base, randomize=True)
  adapted = _logits(model, variables)
  assert np.abs(adapted - reference).max() > 1e-3  # the adapters do something
  np.testing.assert_array_equal(_logits(model, variables, adapters_enabled=False), reference)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_adapter_params(base, kind):
  model, variables = _adapted(adapters.AdapterConfig(kind=kind, attention_experts=True), base)
  trainable, frozen = adapters.split(variables)
  assert set(trainable) == {"adapter"} and set(frozen) == {"params"}

  def loss(p, enabled=True):
    out = model.apply(adapters.join(p, frozen), *_inputs(), adapters_enabled=enabled)
    return jnp.mean(out.logits ** 2)

  grads = jax.grad(loss)(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  flat = flax.traverse_util.flatten_dict(grads["adapter"])
  # Zero-initialised B (and the experts' B) receive gradient; every adapted module is reached.
  b_norms = {k: float(jnp.abs(v).sum()) for k, v in flat.items() if k[-1] in ("b",) or
             k[-1].endswith("_b")}
  assert b_norms and all(n > 0 for n in b_norms.values()), b_norms
  # With the adapters off nothing reaches them.
  off = jax.grad(lambda p: loss(p, enabled=False))(trainable)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(off))
  # Full-model gradients through the public split never include base parameters.
  assert "params" not in grads


def test_graph_moe_with_one_step_equals_moe_lora(base):
  moe = adapters.AdapterConfig(kind="moe_lora", experts=4, top_k=2, attention_experts=True)
  moe_model, variables = _adapted(moe, base, randomize=True)
  for combine in ("concat_proj", "gated_residual", "add"):
    graph = dataclasses.replace(moe, kind="graph_moe", steps=1, combine=combine)
    graph_model = decoder_lib.TextDecoder(TEXT, adapter=graph)
    graph_init = nn.unbox(graph_model.init(jax.random.key(1), *_inputs()))
    # Same parameters: the T = 1 GraphMoE has exactly MoE-LoRA's variables.
    assert jax.tree.structure(graph_init["adapter"]) == jax.tree.structure(variables["adapter"])
    np.testing.assert_array_equal(_logits(graph_model, variables), _logits(moe_model, variables))
  # More steps change the output (routing is re-read), on the same experts plus W_m.
  two = dataclasses.replace(moe, kind="graph_moe", steps=2)
  two_model, two_vars = _adapted(two, base, randomize=True)
  one_model = decoder_lib.TextDecoder(TEXT, adapter=dataclasses.replace(two, steps=1))
  one_vars = {"params": two_vars["params"], "adapter": _drop_combine(two_vars["adapter"])}
  assert np.abs(_logits(two_model, two_vars) - _logits(one_model, one_vars)).max() > 1e-6


def _drop_combine(tree):
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not (k[-1] == "router_message" or
                                             k[-1].startswith("combine_"))})


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_skewed():
  tokens, experts = 64, 4
  uniform = moe_lora.route(jnp.zeros((tokens, experts)), top_k=2)[1]
  assert float(uniform) == pytest.approx(1.0, abs=1e-6)
  # Balanced but token-dependent routing: each expert is preferred by a quarter of the tokens.
  balanced_logits = 3.0 * jax.nn.one_hot(jnp.arange(tokens) % experts, experts)
  balanced = float(moe_lora.route(balanced_logits, top_k=1)[1])
  assert balanced == pytest.approx(1.0, abs=1e-5)
  previous = balanced
  for strength in (0.5, 1.0, 2.0, 4.0):  # more and more tokens prefer expert 0
    skewed_logits = jnp.zeros((tokens, experts)).at[:, 0].set(strength)
    skewed = float(moe_lora.route(skewed_logits, top_k=1)[1])
    assert skewed > previous
    previous = skewed
  assert previous == pytest.approx(experts, rel=0.1)  # everything on one expert: ~E
  # Routing weights: top-k, renormalised, zero elsewhere.
  weights = moe_lora.route(jnp.array([[0.0, 1.0, 2.0, 3.0]]), top_k=2)[0]
  assert np.count_nonzero(np.asarray(weights)) == 2
  assert float(weights.sum()) == pytest.approx(1.0)


def test_balance_losses_are_sown_per_routing_call(base):
  for kind, steps, expected in (("moe_lora", 1, 2), ("graph_moe", 3, 6)):
    model, variables = _adapted(adapters.AdapterConfig(kind=kind, steps=steps), base)
    _, state = model.apply(variables, *_inputs(), mutable=[adapters.LOSSES])
    assert len(jax.tree.leaves(state)) == expected  # 2 layers x steps
    assert 0.9 < float(adapters.balance_loss(state)) < 4.0
  model, variables = _adapted(adapters.AdapterConfig(kind="lora"), base)
  _, state = model.apply(variables, *_inputs(), mutable=[adapters.LOSSES])
  assert float(adapters.balance_loss(state)) == 0.0


def test_parameter_counts(base):
  h, i, layers = TEXT.hidden_size, TEXT.intermediate_size, TEXT.num_layers
  q, kv = TEXT.num_heads * TEXT.head_dim, TEXT.num_kv_heads * TEXT.head_dim
  r, e = 4, 3
  count = lambda cfg: adapters.count_params(_adapted(cfg, base)[1]["adapter"])
  lora_per_layer = r * ((h + q) + (h + kv) + 2 * (h + i) + (i + h))  # q, v, gate, up, down
  assert count(adapters.AdapterConfig(kind="lora", rank=r)) == layers * lora_per_layer
  attention_lora = r * ((h + q) + (h + kv))
  experts = e * r * 3 * (h + i) + h * e  # E x (gate, up, down) LoRAs + the router
  moe = adapters.AdapterConfig(kind="moe_lora", rank=r, experts=e, top_k=1)
  assert count(moe) == layers * (attention_lora + experts)
  graph = dataclasses.replace(moe, kind="graph_moe", steps=2)
  assert count(graph) == layers * (attention_lora + experts + h * e)  # + W_m
  assert count(dataclasses.replace(graph, combine="gated_residual")) == \
      layers * (attention_lora + experts + 2 * h + 1)
  assert count(dataclasses.replace(graph, combine="add")) == layers * (attention_lora + experts)
  # Separate expert rank; experts on attention: per projection E x LoRA + a router.
  assert count(dataclasses.replace(moe, expert_rank=2)) == layers * (
      attention_lora + e * 2 * 3 * (h + i) + h * e)
  assert count(dataclasses.replace(moe, attention_experts=True)) == layers * (
      e * r * ((h + q) + (h + kv)) + 2 * h * e + experts)
  # Targets are a regex over paths: only layer 0's up_proj.
  assert count(adapters.AdapterConfig(kind="lora", rank=r, targets="layers_0/mlp/up_proj")) \
      == r * (h + i)


def test_lora_merge_equals_the_adapted_forward(base):
  cfg = adapters.AdapterConfig(kind="lora", rank=4, alpha=8.0,
                               targets="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
  model, variables = _adapted(cfg, base, randomize=True)
  merged = adapters.merge_adapters(variables, cfg)
  assert set(merged) == {"params"}
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  plain = _logits(decoder_lib.TextDecoder(TEXT), merged)
  np.testing.assert_allclose(plain, _logits(model, variables), atol=2e-5, rtol=1e-5)
  assert np.abs(plain - _logits(decoder_lib.TextDecoder(TEXT), base)).max() > 1e-3


@pytest.mark.parametrize("kind", ("moe_lora", "graph_moe"))
def test_expert_adapters_refuse_to_merge(base, kind):
  cfg = adapters.AdapterConfig(kind=kind)
  _, variables = _adapted(cfg, base)
  with pytest.raises(ValueError, match="cannot be merged"):
    adapters.merge_adapters(variables, cfg)


def test_dropout_only_with_a_dropout_rng(base):
  model, variables = _adapted(adapters.AdapterConfig(kind="lora", dropout=0.5), base,
                              randomize=True)
  plain = _logits(model, variables)
  np.testing.assert_array_equal(plain, _logits(model, variables))
  dropped = _logits(model, variables, rngs={"dropout": jax.random.key(3)})
  assert np.abs(dropped - plain).max() > 1e-4


def test_remat_and_kv_cache_with_adapters(base):
  cfg = adapters.AdapterConfig(kind="graph_moe", attention_experts=True)
  model, variables = _adapted(cfg, base, randomize=True)
  remat = decoder_lib.TextDecoder(TEXT, remat=True, adapter=cfg)
  np.testing.assert_allclose(_logits(remat, variables), _logits(model, variables), atol=1e-6)
  np.testing.assert_allclose(_logits(remat, variables, adapters_enabled=False),
                             _logits(model, variables, adapters_enabled=False), atol=1e-6)
  # Prefill + one decode step equals the full forward at the last position.
  ids, positions, mask = _inputs()
  cache = decoder_lib.init_cache(TEXT, 2, 8)
  out = model.apply(variables, ids[:, :-1], positions[:, :-1], mask[:, :-1], cache)
  step = model.apply(variables, ids[:, -1:], positions[:, -1:], mask[:, -1:], out.cache)
  np.testing.assert_allclose(np.asarray(step.logits[:, -1]), _logits(model, variables)[:, -1],
                             atol=1e-5)


def test_vision_language_model_with_adapter():
  cfg = dataclasses.replace(presets.get_preset("tiny"),
                            adapter=adapters.AdapterConfig(kind="moe_lora"))
  trainable = mllm.init_adapters(cfg, jax.random.key(0))
  assert set(trainable) == {"adapter"}
  assert set(trainable["adapter"]) == {"decoder"}  # the vision tower stays frozen
  assert "adapter" in mllm.abstract_params(cfg)


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="top_k"):
    adapters.AdapterConfig(kind="moe_lora", experts=2, top_k=3)
  with pytest.raises(ValueError, match="combine"):
    adapters.AdapterConfig(kind="graph_moe", combine="gru")
  with pytest.raises(ValueError, match="kind"):
    adapters.AdapterConfig(kind="dora")
  with pytest.raises(ValueError, match="unknown fields"):
    adapters.from_config({"kind": "lora", "rnak": 4})
  assert adapters.from_config({"kind": "none", "rank": 4}) is None


def test_merged_lora_exports_through_save_hf(tmp_path):
  from jigsaw_jax.models import hf_io
  base_cfg = presets.get_preset("tiny")
  cfg = dataclasses.replace(base_cfg, adapter=adapters.AdapterConfig(kind="lora", rank=2))
  base = mllm.init_params(base_cfg, jax.random.key(0))
  trainable = jax.tree.map(lambda x: x + 0.1, mllm.init_adapters(cfg, jax.random.key(1)))
  merged = adapters.merge_adapters(adapters.join(trainable, base), cfg)
  hf_io.save_hf(merged, base_cfg, tmp_path / "export")
  loaded, _ = hf_io.load_hf(tmp_path / "export", base_cfg)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  q = ("decoder", "layers_0", "self_attn", "q_proj", "kernel")
  get = lambda tree: flax.traverse_util.flatten_dict(tree["params"])[q]
  assert np.abs(np.asarray(get(merged)) - np.asarray(get(base))).max() > 1e-3
