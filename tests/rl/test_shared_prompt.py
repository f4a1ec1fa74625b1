"""Scoring with shared prompts (each prompt and its images run once, the KV cache repeated over
its G completions) gives the row-by-row numbers: log-probs, entropies, loss and gradients."""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest

from jigsaw_jax.models import adapters, mllm
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.sequences import build_sequences, split_rows
from jigsaw_jax.rl.optim import make_optimizer
from jigsaw_jax.rl.policy_steps import PolicySteps
from jigsaw_jax.tools import scale_check

GROUP = 3
NEW_TOKENS = 5


def _batch(cfg, grids, group=GROUP, seed=0):
  """Left-padded prompts of different lengths, prompt p with one image of grids[p], sampled
  `group` times; completions of different lengths (one of a single token)."""
  rng = np.random.default_rng(seed)
  merge = cfg.vision.spatial_merge_size
  rows, pixels = [], []
  v = cfg.vision
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  for i, grid in enumerate(grids):
    pre = rng.integers(1, 1000, 1 + 3 * i)
    post = rng.integers(1, 1000, 2)
    rows.append(np.concatenate([pre, [cfg.vision_start_token_id],
                                [cfg.image_token_id] * (int(np.prod(grid)) // merge ** 2),
                                [cfg.vision_end_token_id], post]))
    pixels.append(rng.normal(size=(int(np.prod(grid)), patch_dim)).astype(np.float32))
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  prompts = PromptBatch(ids, mask, np.concatenate(pixels), np.asarray(grids, np.int32))
  r = len(grids) * group
  completion = rng.integers(1, 1000, (r, NEW_TOKENS)).astype(np.int32)
  lengths = rng.integers(1, NEW_TOKENS + 1, r)
  lengths[0] = 1
  completion_mask = (np.arange(NEW_TOKENS)[None] < lengths[:, None]).astype(np.float32)
  seq = build_sequences(cfg, prompts, completion, completion_mask, group)
  advantages = rng.normal(size=(r,)).astype(np.float32)
  return seq, advantages


def _model(adapter=None):
  cfg = dataclasses.replace(scale_check.check_model_config(), adapter=adapter)
  base_cfg = dataclasses.replace(cfg, adapter=None)
  params = mllm.init_params(base_cfg, jax.random.key(0))
  if adapter is not None:
    trained = mllm.init_adapters(cfg, jax.random.key(1))
    # LoRA's B starts at zero; move it so the adapter changes the numbers being compared.
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                           trained)
    params = adapters.join(trained, params)
  return cfg, params


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


GRIDS = {"equal_images": [(1, 4, 4), (1, 4, 4)], "unequal_images": [(1, 4, 4), (1, 4, 8)]}
ADAPTERS = {
    "none": None,
    "lora": adapters.AdapterConfig(kind="lora", rank=2),
    # The balance loss is the one term shared prompts compute differently (see
    # shared_prompt_scores); without it MoE routing must match exactly too.
    "graph_moe": adapters.AdapterConfig(kind="graph_moe", rank=2, experts=2, top_k=1,
                                        balance_coef=0.0),
}


# Unequal images without adapters is the quick case; the others take 20-40 s each on 2 cores.
CASES = [pytest.param(a, i, marks=() if (a, i) == ("none", "unequal_images") else pytest.mark.slow)
         for a in sorted(ADAPTERS) for i in sorted(GRIDS)]


@pytest.mark.parametrize("adapter, images", CASES)
def test_shared_prompt_equals_row_by_row(adapter, images):
  cfg, params = _model(ADAPTERS[adapter])
  seq, advantages = _batch(cfg, GRIDS[images])
  loss_cfg = losses.LossConfig(name="grpo", beta=0.04, max_completion_length=NEW_TOKENS)
  optimizer = make_optimizer(1e-3, 10)
  shared = PolicySteps(cfg, loss_cfg, optimizer)
  rows = PolicySteps(cfg, loss_cfg, optimizer, share_prompt=False)
  assert shared.prompt_group(seq) == GROUP and rows.prompt_group(seq) == 1

  mask = seq.completion_mask.astype(bool)
  for enabled in ([True, False] if ADAPTERS[adapter] else [True]):
    logp, entropy = shared.score(params, seq, adapters_enabled=enabled)
    want_logp, want_entropy = rows.score(params, seq, adapters_enabled=enabled)
    # Every position, padding after EOS included (it is computed the same way on both paths).
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    assert _rel(np.asarray(logp)[mask], np.asarray(want_logp)[mask]) < 1e-6

  ref_logp = rows.score(params, seq, adapters_enabled=False)[0] if ADAPTERS[adapter] else \
      rows.score(jax.tree.map(lambda x: x * 0.99, params), seq)[0]
  old_logp = np.asarray(want_logp) - 0.01  # a ratio that is not 1, so clipping takes part
  grads, loss, metrics = shared.grads(params, seq, advantages, old_logp, ref_logp)
  want_grads, want_loss, want_metrics = rows.grads(params, seq, advantages, old_logp, ref_logp)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, atol=1e-7)
  for name in set(want_metrics) - {"balance_loss"}:  # reported, weighted 0 here
    np.testing.assert_allclose(float(metrics[name]), float(want_metrics[name]), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  assert _rel(_flat(grads), _flat(want_grads)) < 1e-5
  assert np.linalg.norm(_flat(want_grads)) > 0


def test_moe_balance_loss_is_the_only_difference():
  adapter = adapters.AdapterConfig(kind="moe_lora", rank=2, experts=2, top_k=1,
                                   balance_coef=0.01)
  cfg, params = _model(adapter)
  seq, advantages = _batch(cfg, GRIDS["equal_images"])
  loss_cfg = losses.LossConfig(name="grpo", beta=0.0, max_completion_length=NEW_TOKENS)
  shared = PolicySteps(cfg, loss_cfg, make_optimizer(1e-3, 10))
  rows = PolicySteps(cfg, loss_cfg, make_optimizer(1e-3, 10), share_prompt=False)
  _, loss, metrics = shared.grads(params, seq, advantages)
  _, want_loss, want_metrics = rows.grads(params, seq, advantages)
  policy = lambda l, m: float(l) - adapter.balance_coef * float(m["balance_loss"])
  np.testing.assert_allclose(policy(loss, metrics), policy(want_loss, want_metrics), rtol=1e-5,
                             atol=1e-7)
  assert np.isfinite(float(metrics["balance_loss"]))


@pytest.mark.slow
def test_adapter_dropout_runs_with_shared_prompts():
  cfg, params = _model(adapters.AdapterConfig(kind="lora", rank=2, dropout=0.3))
  seq, advantages = _batch(cfg, GRIDS["equal_images"])
  steps = PolicySteps(cfg, losses.LossConfig(beta=0.0), make_optimizer(1e-3, 10))
  assert steps.prompt_group(seq) == GROUP
  key = jax.random.key(7)
  g1, l1, _ = steps.grads(params, seq, advantages, rng=key)
  g2, l2, _ = steps.grads(params, seq, advantages, rng=key)
  g0, _, _ = steps.grads(params, seq, advantages)
  assert np.isfinite(float(l1)) and float(l1) == float(l2)
  np.testing.assert_array_equal(_flat(g1), _flat(g2))  # the same key, the same masks
  assert _rel(_flat(g1), _flat(g0)) > 1e-3  # and dropout did act


def test_micro_batches_keep_whole_groups_shared():
  cfg, params = _model()
  seq, _ = _batch(cfg, [(1, 4, 4)] * 4, group=2)
  steps = PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10))
  whole = [m.group for m in split_rows(seq, 2)]  # 4 rows each: two groups
  cut = [m.group for m in split_rows(seq, 8)]  # 1 row each: nothing shared
  assert whole == [2, 2] and cut == [1] * 8
  full = np.asarray(PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10),
                                share_prompt=False).score(params, seq)[0])
  parts = np.concatenate([np.asarray(steps.score(params, m)[0]) for m in split_rows(seq, 2)])
  np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-5)


def test_rows_by_themselves_where_prompts_do_not_split_over_the_mesh():
  cfg = scale_check.check_model_config()
  seq, _ = _batch(cfg, [(1, 4, 4)] * 2, group=4)  # 2 prompts, 8 rows
  steps = PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10))
  assert steps.prompt_group(seq) == 4
  assert steps.prompt_group(seq._replace(group=1)) == 1
  assert PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10),
                     share_prompt=False).prompt_group(seq) == 1
  # The rule on a mesh, from shapes (a stand-in mesh: this process has one device).
  mesh = lambda data: types.SimpleNamespace(shape={"data": data, "fsdp": 1, "tensor": 1},
                                            axis_names=("data", "fsdp", "tensor"))
  decide = lambda data, rows=8, group=4, images=8: PolicySteps.shared_group(
      types.SimpleNamespace(share_prompt=True, mesh=mesh(data)), rows, group, images)
  assert decide(2) == 4  # one prompt per device
  assert decide(8) == 1  # 2 prompts over 8 devices: every row scored on its own (as before)
  assert decide(1, rows=6) == 1  # not whole groups
  assert decide(1, images=4) == 1  # rows without images next to rows with
