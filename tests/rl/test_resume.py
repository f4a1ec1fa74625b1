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

from configs import curriculum_3x1_4x1
from jigsaw_jax import data as data_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.rl.grpo import train as trainer

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


class _Killed(Exception):
  """Stands for the process dying in the middle of a step."""


def _curriculum_config():
  c = curriculum_3x1_4x1.get_config("tiny")
  c.total_steps = 4
  c.data.pipeline.curriculum = [{"start_step": 2, "m": 4}]  # steps 3 and 4 are in stage 2
  c.data.pipeline.prompts_per_batch, c.data.pipeline.group_size = 2, 2
  c.rollout.max_new_tokens = 4
  c.pretrain.steps = 0
  c.eval.at_start = c.eval.at_end = False
  c.eval.every_steps = 0
  c.checkpoint.async_save = False
  c.checkpoint.save_every_steps = 1
  return c


def _puzzle_record(puzzles):
  """What identifies a step's puzzles: each puzzle in full, its image included."""
  return [(p.question_type, p.m, p.n, p.permutation, p.pair, p.solution, p.prompt,
           p.image.tobytes()) for p in puzzles]


@pytest.mark.slow
def test_a_run_killed_in_stage_two_resumes_in_stage_two_at_the_same_puzzle(tmp_path):
  config = _curriculum_config()
  group = config.data.pipeline.group_size
  # The puzzles of an uninterrupted run's four steps (the trainer reads this iterator in order).
  batches = iter(data_lib.make_dataset(config.data))
  straight = [next(batches) for _ in range(4)]
  assert [b["stage"][::group].tolist() for b in straight] == [[0, 0], [0, 0], [1, 1], [1, 1]]
  assert all(p.question_type == "pair" and p.m * p.n == 4 for p in straight[3]["puzzle"])
  straight = [_puzzle_record(b["puzzle"][::group]) for b in straight]
  drawn, kill_at = [], [4]

  def recording_rewards(puzzles, texts, group):
    """The rule-based rewards, recording each step's puzzles; the run dies at step kill_at."""
    if len(drawn) + 1 == kill_at[0]:
      raise _Killed()
    drawn.append(_puzzle_record(puzzles))
    return rollout_rewards.score_texts(puzzles, texts, group)

  # Killed while scoring step 4's puzzles: the last checkpoint is step 3, inside stage 2.
  with pytest.raises(_Killed):
    trainer.train_and_evaluate(config, str(tmp_path), rewards=recording_rewards)
  assert drawn == straight[:3]
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved[-1] == 3
  drawn.clear()
  kill_at[0] = None
  trainer.train_and_evaluate(_curriculum_config(), str(tmp_path), rewards=recording_rewards)
  assert drawn == straight[3:]  # one step: step 4, the same stage-2 puzzles, images and prompts
