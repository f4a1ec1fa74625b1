"""One restore path: another run's params into abstract targets, for eval, init_from, export."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import eval as eval_config
from configs import jigsaw_2x1
from jigsaw_jax import main
from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import restore as restore_lib


def test_restore_part_reads_params_alone_into_an_abstract_target(tmp_path):
  params = {"params": {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}}
  state = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(3),
           "rng": jax.random.key(1)}
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, force=True)
  target = restore_lib.abstract(params)  # no optimizer, no arrays
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    step, got = ckpt.restore_part("params", target)
    assert step == 3
    np.testing.assert_array_equal(got["params"]["w"], params["params"]["w"])
    wrong = restore_lib.abstract({"params": {"w": jnp.zeros((4, 4)), "b": jnp.ones(3)}})
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match=r"params/w.*\(4, 3\)"):
      ckpt.restore_part("params", wrong)


def _short(config):
  config.pretrain.steps = 2
  config.total_steps = 2
  config.data.pipeline.prompts_per_batch = 2
  config.eval.sizes = ("2x1",)
  config.eval.question_types = ("full",)
  config.eval.num_puzzles = 4
  config.eval.batch_size = 4
  config.checkpoint.async_save = False
  return config


def _completions(path, step):
  with open(path) as f:
    return [(r["prompt"], r["completion"]) for r in map(json.loads, f) if r["step"] == step]


@pytest.mark.slow
def test_eval_of_a_tiny_run_needs_no_preset_and_refuses_another_model(tmp_path):
  run_dir, eval_dir = str(tmp_path / "run"), str(tmp_path / "eval")
  main.run(_short(jigsaw_2x1.get_config("tiny")), run_dir)
  assert os.path.exists(os.path.join(run_dir, "config.json"))

  # configs/eval.py without :tiny: the model, photos, image size and prompt style come from the
  # run's config.json; the restored policy answers exactly as it did at the run's last eval.
  config = _short(eval_config.get_config())
  config.restore.workdir = run_dir
  explicit = ["eval.sizes", "eval.question_types", "eval.num_puzzles", "eval.batch_size"]
  records = main.run(config, eval_dir, explicit)
  assert config.model.preset == "tiny_jigsaw"
  run_records = json.load(open(os.path.join(run_dir, "eval.json")))
  final = [r for r in run_records if r["step"] == 2]
  assert [r["accuracy"] for r in records] == [r["accuracy"] for r in final]
  assert records[0]["step"] == 2
  got = _completions(os.path.join(eval_dir, "eval_puzzles.jsonl"), 2)
  assert len(got) == 4 and got == _completions(os.path.join(run_dir, "eval_puzzles.jsonl"), 2)

  # An explicit model override wins, and a checkpoint that does not fit says what differs.
  other = _short(eval_config.get_config())
  other.restore.workdir = run_dir
  other.model.preset = "tiny"
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"(?s)params/.*model.preset='tiny_jigsaw'"):
    main.run(other, str(tmp_path / "eval2"), explicit + ["model.preset"])
