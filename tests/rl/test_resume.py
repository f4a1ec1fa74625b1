"""kill -9 in the middle of a tiny GRPO run, run the same command again: it continues from the last
checkpoint and every later metric equals the uninterrupted run's."""

import collections
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

COMPARED = ("reward/total", "reward/accuracy", "reward/format", "loss", "grad_norm", "entropy",
            "completion/length_tokens")
TOTAL_STEPS = 10


def _command(workdir):
  return [sys.executable, "-m", "jigsaw_jax.main", "--config=configs/jigsaw_2x1.py:tiny",
          f"--workdir={workdir}", f"--config.total_steps={TOTAL_STEPS}",
          "--config.pretrain.steps=0", "--config.eval.at_start=False",
          "--config.eval.at_end=False", "--config.checkpoint.save_every_steps=2",
          "--config.checkpoint.max_to_keep=2", "--config.data.pipeline.prompts_per_batch=2",
          "--config.data.pipeline.group_size=4", "--config.rollout.max_new_tokens=4",
          "--config.optim.learning_rate=1e-2", "--config.rl.beta=0.04"]


def _scalars(workdir):
  """{tag: {step: value}} from every event file in the workdir (later files win)."""
  from tensorflow.compat.v1 import train
  from tensorflow.core.util import event_pb2  # noqa: F401  (registers the proto)
  import tensorflow as tf
  values = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for event in train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag not in COMPARED:  # text summaries (config, samples) are not numbers
          continue
        if v.HasField("tensor"):
          values[v.tag][event.step] = float(tf.make_ndarray(v.tensor))
        elif v.HasField("simple_value"):
          values[v.tag][event.step] = v.simple_value
  return values


@pytest.mark.slow
def test_kill_and_rerun_continues_exactly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  subprocess.run(_command(straight), cwd=root, env=env, check=True, capture_output=True)

  proc = subprocess.Popen(_command(resumed), cwd=root, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  marker = resumed / "checkpoints" / "4"
  while not (marker.is_dir() and any(marker.iterdir())) and time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail("the run ended before it could be killed")
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(_scalars(resumed).get("loss", {0: None}))
  assert killed_at < TOTAL_STEPS, "the run finished before the kill"

  rerun = subprocess.run(_command(resumed), cwd=root, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resumed from step" in rerun.stdout  # a console line, shown at every verbosity

  a, b = _scalars(straight), _scalars(resumed)
  for tag in COMPARED:
    assert sorted(a[tag]) == list(range(1, TOTAL_STEPS + 1)), tag
    for step in range(1, TOTAL_STEPS + 1):
      assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-6, abs=1e-7), (tag, step)
