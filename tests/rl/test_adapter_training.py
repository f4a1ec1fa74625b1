"""Two-step GRPO and SFT runs with each adapter kind: the adapter trains, the base stays frozen,
and checkpoints hold the adapter (and its optimizer state) only."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs import jigsaw_2x1
from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib
from jigsaw_jax.models import adapters, mllm
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.sft import train as sft
from jigsaw_jax.rl.grpo import train as trainer

KINDS = ("lora", "moe_lora", "graph_moe")


def _config(kind: str, task: str):
  c = jigsaw_2x1.get_config("tiny")
  c.task = task
  c.total_steps = 2
  c.pretrain.steps = 0
  c.eval.at_start = c.eval.at_end = False
  c.checkpoint.save_every_steps = 1
  c.checkpoint.async_save = False
  c.data.pipeline.prompts_per_batch = 2
  c.data.pipeline.group_size = 2
  c.rollout.max_new_tokens = 4
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 0
  c.rl.beta = 0.04  # exercises the KL reference: the same weights with the adapters off
  c.adapter.kind = kind
  c.adapter.rank = 4
  c.adapter.experts = 3
  c.adapter.dropout = 0.1
  return c


def _saved_adapter(config, workdir):
  """The adapter params of the run's last checkpoint, through the one restore path (which tells
  an adapter run from its tree and rebuilds the frozen base); without the adapter in the config
  the restore is refused with what to pass."""
  found = restore_lib.run_params(workdir, config)
  assert found.kind == restore_lib.ADAPTER and found.step == config.total_steps
  assert set(found.variables) == {"params", "adapter"}
  like = mllm.init_adapters(found.model_cfg, jax.random.key(0))
  plain = config.copy_and_resolve_references()
  plain.adapter.kind = "none"
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="adapter"):
    restore_lib.run_params(workdir, plain)
  return {"adapter": found.variables["adapter"]}, like


def _check_trained(saved, like, kind):
  assert set(saved) == {"adapter"}
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(like))]
  assert any(changed)
  # LoRA's B (zero at init) moved away from zero: the adapter changes the policy now.
  flat = jax.tree_util.tree_flatten_with_path(saved)[0]
  b = [x for path, x in flat if str(path[-1].key) in ("b", "gate_b", "up_b", "down_b")]
  assert b and max(float(np.abs(x).max()) for x in b) > 0, kind
  # Small checkpoints: the adapter is a small fraction of the tiny policy.
  assert adapters.count_params(saved) < 0.35 * 1.2e6


def _noisy_rewards():
  """A random tiny policy scores 0 on every completion, so every advantage would be 0; noise on
  the total reward gives the 2-step run a gradient to follow."""
  noise = np.random.RandomState(0)

  def score_texts(puzzles, texts, group):
    scores = rollout_rewards.score_texts(puzzles, texts, group)
    scores["total"] = scores["total"] + noise.rand(*scores["total"].shape).astype(np.float32)
    return scores
  return score_texts


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_grpo_with_adapter_trains_and_checkpoints_only_the_adapter(tmp_path, kind):
  config = _config(kind, "grpo")
  metrics = trainer.train_and_evaluate(config, str(tmp_path), rewards=_noisy_rewards())
  assert np.isfinite(metrics["loss"]) and metrics["skipped_update"] == 0.0
  assert metrics["grad_norm"] > 0
  if kind != "lora":
    assert 0.9 < metrics["balance_loss"] < config.adapter.experts
  saved, like = _saved_adapter(config, str(tmp_path))
  _check_trained(saved, like, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sft_with_adapter_trains_and_checkpoints_only_the_adapter(tmp_path, kind):
  config = _config(kind, "sft")
  state = sft.train(config, str(tmp_path))
  assert set(state["params"]) == {"adapter"}
  saved, like = _saved_adapter(config, str(tmp_path))
  _check_trained(saved, like, kind)


def _sequences(rows=4, prompt=5, completion=3, seed=0):
  from jigsaw_jax.rl.sequences import SequenceBatch
  rng = np.random.RandomState(seed)
  length = prompt + completion
  ids = rng.randint(0, 1000, (rows, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length), (3, rows, length)).astype(np.int32)
  return SequenceBatch(ids[:, :prompt], np.ones_like(ids[:, :prompt]), positions[..., :prompt],
                       None, ids[:, prompt:], np.ones((rows, completion), np.float32),
                       positions[..., prompt:], ())


@pytest.mark.slow
@pytest.mark.parametrize("use_mesh", [False, True])
def test_policy_steps_differentiate_only_the_adapter(use_mesh):
  from jigsaw_jax.runtime import sharding as sharding_lib
  from jigsaw_jax.models import presets, mllm
  from jigsaw_jax.rl.grpo import losses
  from jigsaw_jax.rl.optim import make_optimizer
  from jigsaw_jax.rl.policy_steps import PolicySteps
  base_cfg = presets.get_preset("tiny")
  cfg = dataclasses.replace(base_cfg, adapter=adapters.AdapterConfig(kind="graph_moe", rank=2,
                                                                      experts=2, top_k=1))
  base = mllm.init_params(base_cfg, jax.random.key(0))
  trainable = mllm.init_adapters(cfg, jax.random.key(1))
  optimizer = make_optimizer(1e-2, 10)
  mesh = sharding_lib.make_mesh((1, -1, 1)) if use_mesh else None
  steps = PolicySteps(cfg, losses.LossConfig(beta=0.04), optimizer, mesh=mesh)
  seq = _sequences()
  plain = PolicySteps(base_cfg, losses.LossConfig(), optimizer)
  base_logp = np.asarray(plain.score(base, seq)[0])
  variables = adapters.join(trainable, base)
  # The KL reference: the same variables with the adapters off is the base model.
  ref = np.asarray(steps.score(variables, seq, adapters_enabled=False)[0])
  np.testing.assert_allclose(ref, base_logp, atol=1e-6)
  advantages = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  grads, loss, metrics = steps.grads(variables, seq, advantages, None, ref,
                                     rng=jax.random.key(2))
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)  # no base gradient at all
  assert "balance_loss" in metrics and np.isfinite(float(loss))
  opt_state = steps.init_optimizer(trainable)
  new, opt_state, stats = steps.apply_update(trainable, opt_state, grads)
  assert float(stats["finite"]) == 1.0 and float(stats["grad_norm"]) > 0
  moved = np.asarray(steps.score(adapters.join(new, base), seq)[0])
  assert np.abs(moved - base_logp).max() > 1e-6
