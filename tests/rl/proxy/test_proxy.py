"""Proxy-RLHF: the accept/reject decode loop against the base sampler, the rejection rules, and
where the gradient goes."""

import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jigsaw_jax.models import mllm, presets
from jigsaw_jax.models.processing import Processor, collate
from jigsaw_jax.rl.proxy import loss as proxy_loss_lib
from jigsaw_jax.rl.proxy import network as proxy_lib
from jigsaw_jax.rl.proxy import sampler as proxy_sampler
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig

ACCEPT, REJECT = 1e4, -1e4  # logits whose sigmoid is exactly 1 / 0 in float32
STEPS, GROUP = 6, 3


class ScriptedProxy(nn.Module):
  """Accept logit `bias` for every candidate, except REJECT for the token whose embedding is
  `target` (any state)."""

  @nn.compact
  def __call__(self, state, candidate):
    bias = self.param("bias", nn.initializers.zeros, ())
    target = self.param("target", nn.initializers.zeros, (candidate.shape[-1],))
    hit = jnp.all(candidate == target, axis=-1)
    return jnp.where(hit, REJECT, bias) + 0.0 * state.sum(-1)


def scripted(bias, target):
  return {"params": {"bias": jnp.float32(bias), "target": jnp.asarray(target, jnp.float32)}}


@pytest.fixture(scope="module")
def setup():
  cfg = presets.tiny()
  params = mllm.init_params(cfg, jax.random.key(0))
  processor = Processor.from_pretrained(None)
  rng = np.random.default_rng(0)
  encoded = [processor.encode_prompt(t, rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
             for t in ("Solve the 2x1 puzzle.", "Which patch goes on top?")]
  batch = collate(encoded, processor.pad_token_id, buckets=8)
  rollout_cfg = lambda top_k=50: RolloutConfig(
      max_new_tokens=STEPS, group_size=GROUP, sampling=SamplingConfig(top_k=top_k),
      eos_ids=processor.special_ids.eos_ids, pad_id=processor.pad_token_id)
  base = Sampler(cfg, rollout_cfg()).generate(params, batch, jax.random.key(5))
  return cfg, params, batch, rollout_cfg, base


@pytest.fixture(scope="module")
def sampler(setup):
  cfg, _, _, rollout_cfg, _ = setup
  return proxy_sampler.ProxySampler(cfg, rollout_cfg(), proxy_lib.ProxyConfig(max_rejections=3),
                                ScriptedProxy())


def _no_target(cfg):
  return np.zeros(cfg.text.hidden_size)  # no token's embedding is all zeros


def test_always_accept_reproduces_the_base_sampler(setup, sampler):
  cfg, params, batch, _, base = setup
  out = sampler.generate(params, scripted(ACCEPT, _no_target(cfg)), batch, jax.random.key(5))
  np.testing.assert_array_equal(out.tokens, base.tokens)
  np.testing.assert_array_equal(out.mask, base.mask)
  np.testing.assert_allclose(out.logprobs, base.logprobs, atol=1e-6)
  # One decision per generated token, all accepted.
  assert int(out.asked.sum()) == int(base.mask.sum())
  assert int(out.rejections.sum()) == 0
  assert bool(jnp.all(out.accepted[:, :, 0] == out.mask))


def test_a_rejected_token_never_gets_through(setup, sampler):
  cfg, params, batch, _, base = setup
  banned = int(base.tokens[0, 0])  # the base's first token of row 0: proposed there first
  embedding = proxy_lib.embedding_table(params)
  out = sampler.generate(params, scripted(ACCEPT, embedding[banned]), batch, jax.random.key(5))
  assert int(out.candidates[0, 0, 0]) == banned and not bool(out.accepted[0, 0, 0])
  assert banned not in np.asarray(out.tokens)[np.asarray(out.mask)]
  assert int(out.rejections[0, 0]) == 1 and int(out.tokens[0, 0]) != banned
  # Up to the first place where the proxy vetoed, every row equals the base's.
  first_veto = np.argmax(np.asarray(out.rejections) > 0, axis=1)
  for row, t in enumerate(first_veto):
    if np.asarray(out.rejections[row]).any():
      np.testing.assert_array_equal(out.tokens[row, :t], base.tokens[row, :t])


def test_the_rejection_cap_holds_then_the_fallback_samples(setup, sampler):
  cfg, params, batch, _, _ = setup
  out = sampler.generate(params, scripted(REJECT, _no_target(cfg)), batch, jax.random.key(5))
  mask = np.asarray(out.mask)
  rejections = np.asarray(out.rejections)
  # A proxy that rejects everything spends exactly the cap (3) at every position, then the
  # fourth candidate is taken without asking it.
  assert (rejections[mask] == 3).all() and (rejections[~mask] == 0).all()
  asked = np.asarray(out.asked).sum(-1)
  assert (asked[mask] == 3).all()
  candidates, tokens = np.asarray(out.candidates), np.asarray(out.tokens)
  for row, t in zip(*np.nonzero(mask)):
    assert len(set(candidates[row, t].tolist())) == 4  # fresh candidates, none proposed twice
    assert tokens[row, t] == candidates[row, t, 3] and tokens[row, t] not in candidates[row, t, :3]


def test_first_rejected_fallback_overrules_the_veto(setup):
  cfg, params, batch, rollout_cfg, base = setup
  sampler = proxy_sampler.ProxySampler(
      cfg, rollout_cfg(), proxy_lib.ProxyConfig(max_rejections=2, fallback="first_rejected"),
      ScriptedProxy())
  out = sampler.generate(params, scripted(REJECT, _no_target(cfg)), batch, jax.random.key(5))
  np.testing.assert_array_equal(out.tokens, base.tokens)  # what the policy alone samples
  mask = np.asarray(out.mask)
  assert (np.asarray(out.rejections)[mask] == 2).all()


def test_the_proxy_cannot_empty_the_plausible_set(setup):
  cfg, params, batch, rollout_cfg, _ = setup
  sampler = proxy_sampler.ProxySampler(cfg, rollout_cfg(top_k=3), proxy_lib.ProxyConfig(
      max_rejections=5), ScriptedProxy())
  out = sampler.generate(params, scripted(REJECT, _no_target(cfg)), batch, jax.random.key(5))
  mask = np.asarray(out.mask)
  # Three plausible tokens: two rejections, then the last one is taken (the cap of 5 never binds).
  assert (np.asarray(out.rejections)[mask] == 2).all()
  assert (np.asarray(out.asked).sum(-1)[mask] == 2).all()
  candidates, tokens = np.asarray(out.candidates), np.asarray(out.tokens)
  for row, t in zip(*np.nonzero(mask)):
    assert len(set(candidates[row, t, :3].tolist())) == 3 and tokens[row, t] == candidates[row,
                                                                                          t, 2]


def test_gradients_reach_only_the_proxy(setup, sampler):
  cfg, params, batch, _, _ = setup
  embedding = proxy_lib.embedding_table(params)
  out = sampler.generate(params, scripted(ACCEPT, embedding[int(setup[4].tokens[0, 0])]), batch,
                         jax.random.key(5))
  pcfg = proxy_lib.ProxyConfig(init_accept_logit=0.5)
  network = proxy_lib.network_for(pcfg, cfg)
  proxy_params = proxy_lib.init_proxy(cfg, pcfg, jax.random.key(1))
  proxy_params = proxy_lib.calibrate_from_rollouts(proxy_params, [out], embedding)
  # Calibrated: the proxy's standardised inputs at its decisions have mean 0 and variance 1.
  inner, asked = proxy_params["params"], np.asarray(out.asked)
  rows = np.nonzero(asked)
  for name, x in (("state", out.states[rows[0], rows[1]]),
                  ("candidate", embedding[out.candidates[asked]])):
    z = (proxy_lib.rms_normalize(x) - inner[f"{name}_mean"]) * inner[f"{name}_scale"]
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    assert abs(float(z.var(0).mean()) - 1.0) < 0.05, name
  # Give the read-out weights so that every proxy parameter is on the gradient's path.
  proxy_params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "out_kernel" in jax.tree_util.keystr(p) else x, proxy_params)
  logits = proxy_loss_lib.decision_logits(network, proxy_params, embedding, out.states,
                                     out.candidates)
  old = jnp.where(out.accepted, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
  out = out._replace(decision_logp=jnp.where(out.asked, old, 0.0))
  advantages = jnp.asarray(np.random.default_rng(0).normal(size=out.tokens.shape[0]),
                           jnp.float32)

  def loss(proxy, policy):
    return proxy_loss_lib.proxy_loss(network, proxy, proxy_lib.embedding_table(policy), out,
                                advantages)[0]

  proxy_grads, policy_grads = jax.grad(loss, argnums=(0, 1))(proxy_params, params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(policy_grads))
  nonzero = {jax.tree_util.keystr(p): float(jnp.abs(g).max()) > 0
             for p, g in jax.tree_util.tree_flatten_with_path(proxy_grads)[0]}
  statistics = {k for k in nonzero if "_mean" in k or "_scale" in k}
  assert len(statistics) == 4 and not any(nonzero[k] for k in statistics)  # calibrated, frozen
  assert all(v for k, v in nonzero.items() if k not in statistics), nonzero


def test_the_proxy_is_small():
  for preset, hidden, bound in (("tiny_jigsaw", 64, 0.05), ("qwen2_5_vl_3b", 256, 0.001)):
    cfg = presets.get_preset(preset)
    pcfg = proxy_lib.ProxyConfig(hidden_dim=hidden)
    proxy = proxy_lib.count_params(proxy_lib.abstract_proxy_params(cfg, pcfg))
    e = cfg.text.hidden_size
    assert proxy == 2 * e * hidden + 4 * e + 3 * hidden + 1
    assert proxy / presets.count_params(preset) < bound


@pytest.mark.slow
def test_task_proxy_trains_and_checkpoints_only_the_proxy(tmp_path):
  from jigsaw_jax.runtime import checkpoint as checkpoint_lib
  from jigsaw_jax import main
  from jigsaw_jax import configlib
  root = str(pathlib.Path(__file__).resolve().parents[3])  # the repository
  config = configlib.load_config_file(os.path.join(root, "configs/proxy_2x1.py:tiny"))
  with config.unlocked():
    config.total_steps = 2
    config.pretrain.steps = 0
    config.eval.at_start = False
    config.eval.at_end = False
    config.data.pipeline.prompts_per_batch = 2
    config.data.pipeline.group_size = 4
    config.rollout.max_new_tokens = 4
  summary = main.run(config, str(tmp_path))
  assert summary["param_ratio"] < 0.05 and summary["steps"] == 2
  assert np.isfinite(summary["metrics"]["loss"])
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 2
  saved = ckpt._manager.item_metadata(2)[checkpoint_lib.STATE]
  assert set(saved) == {"proxy", "opt_state", "step", "rng"}
  assert "decoder" not in str(saved["proxy"]) and "visual" not in str(saved["proxy"])
  ckpt.close()

  # task=eval restores a proxy run (its frozen base and its proxy) from the run's config.json.
  from jigsaw_jax.runtime import restore as restore_lib
  found = restore_lib.run_params(str(tmp_path), config)
  assert found.kind == restore_lib.PROXY and found.step == 2 and found.proxy is not None
  evaluation = configlib.load_config_file(os.path.join(root, "configs/eval.py"))
  with evaluation.unlocked():
    evaluation.restore.workdir = str(tmp_path)
    evaluation.eval.update(sizes=("2x1",), question_types=("full",), num_puzzles=2, batch_size=2)
  records = main.run(evaluation, str(tmp_path / "eval"))
  assert evaluation.model.preset == config.model.preset and records[0]["n"] == 2


def test_prefix_advantages_credit_each_position_against_its_own_prefix():
  rewards = np.array([[1.0, 0.0, 1.0, 0.0]])
  tokens = np.array([[1, 5, 9], [1, 6, 9], [2, 5, 9], [2, 6, 9]])
  mask = np.array([[1, 1, 1]] * 3 + [[1, 1, 0]], bool)
  adv = proxy_loss_lib.prefix_advantages(rewards, tokens, mask)
  scale = np.std(rewards, ddof=1) + 1e-4
  np.testing.assert_allclose(adv[:, 0], (rewards[0] - 0.5) / scale, rtol=1e-6)  # GRPO's
  # At t=1 the first token splits the group in two: each pair is its own baseline.
  np.testing.assert_allclose(adv[:, 1], np.array([0.5, -0.5, 0.5, -0.5]) / scale, rtol=1e-6)
  # At t=2 every prefix is unique: nothing to compare with; past the end of an episode: 0.
  np.testing.assert_array_equal(adv[:, 2], 0.0)
