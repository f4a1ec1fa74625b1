"""clu writers produce TensorBoard event files we can read back; tables and timers behave."""

import glob
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jigsaw_jax.runtime import metrics

tf = pytest.importorskip("tensorflow")


def _read_events(workdir):
  """{tag: [(step, value)]} from every event file under workdir."""
  found = {}
  for path in glob.glob(f"{workdir}/**/events.out.tfevents.*", recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("tensor"):
          array = tf.make_ndarray(value.tensor)
          item = array.item() if array.size == 1 else array
          item = item.decode() if isinstance(item, bytes) else item
        else:
          item = value.simple_value
        found.setdefault(value.tag, []).append((event.step, item))
  return found


def test_scalars_samples_and_config_land_in_event_files(tmp_path):
  writer = metrics.create_writer(str(tmp_path))
  written = metrics.write_scalars(writer, 1, {"reward": {"accuracy": jnp.float32(0.25),
                                                         "format": 1.0},
                                              "kl": np.array([0.5]), "skipped": None})
  assert written == {"reward/accuracy": 0.25, "reward/format": 1.0, "kl": 0.5}
  metrics.write_scalars(writer, 2, {"reward": {"accuracy": 0.75}})
  table = metrics.write_samples(writer, 2, ["Solve 2x1 | left"], ["<answer>2 1</answer>"],
                                {"accuracy": [1.0], "format": [0.5]})
  metrics.write_config(writer, ml_collections.ConfigDict({"lr": 1e-6, "group_size": 8}))
  writer.flush()
  writer.close()

  events = _read_events(tmp_path)
  assert events["reward/accuracy"] == [(1, 0.25), (2, 0.75)]
  assert events["reward/format"] == [(1, 1.0)]
  assert events["kl"] == [(1, 0.5)]
  assert "skipped" not in events
  (step, text), = events["samples"]
  assert step == 2 and text == table
  assert "| # | prompt | completion | reward/accuracy | reward/format |" in text
  assert "| 0 | Solve 2x1 \\| left | <answer>2 1</answer> | 1.000 | 0.500 |" in text
  assert "group_size: 8" in events["config"][0][1]


def test_report_progress_writes_steps_per_second(tmp_path, caplog):
  writer = metrics.create_writer(str(tmp_path), asynchronous=False)
  report = metrics.create_report_progress(writer, num_train_steps=4, every_steps=2,
                                          every_secs=None)
  timer = metrics.StepTimer(report)
  with caplog.at_level(logging.INFO):
    for step in range(1, 5):
      with timer.phase("update"):
        pass
      report(step)
  writer.close()
  events = _read_events(tmp_path)
  assert [s for s, _ in events["steps_per_sec"]] == [2, 4]
  assert all(v > 0 for _, v in events["steps_per_sec"])
  assert any("ETA" in r.getMessage() for r in caplog.records)


def test_step_timer_splits_phases_and_counts_tokens():
  now = [0.0]
  timer = metrics.StepTimer(clock=lambda: now[0])

  def spend(name, seconds):
    with timer.phase(name):
      now[0] += seconds

  spend("rollout", 3.0)
  spend("reward", 0.5)
  spend("update", 1.0)
  spend("reward", 0.5)      # a phase may recur within a step
  now[0] += 1.0             # untimed: input pipeline, logging
  timer.add_tokens(600)
  assert timer.finish_step() == {"time/rollout_s": 3.0, "time/reward_s": 1.0,
                                 "time/update_s": 1.0, "time/other_s": 1.0,
                                 "time/step_s": 6.0, "perf/tokens_per_s": 100.0}
  now[0] += 2.0             # the next step starts where the last one finished
  spend("rollout", 2.0)
  timer.add_tokens(40)
  second = timer.finish_step()
  assert second["time/step_s"] == 4.0 and second["time/other_s"] == 2.0
  assert second["perf/tokens_per_s"] == 10.0 and "time/update_s" not in second


def test_markdown_table_escapes_and_truncates():
  table = metrics.markdown_table({"text": ["a|b\nc", "x" * 50, "unseen"], "r": [1, 2.0, 3]},
                                 max_rows=2, max_chars=10)
  lines = table.splitlines()
  assert lines[0] == "| # | text | r |"
  assert lines[2] == "| 0 | a\\|b<br>c | 1 |"
  assert lines[3] == "| 1 | xxxxxxxxx… | 2.000 |"
  assert len(lines) == 4
  with pytest.raises(ValueError, match="differ in length"):
    metrics.markdown_table({"a": [1], "b": [1, 2]})


def test_non_scalar_metric_is_refused():
  with pytest.raises(ValueError, match="'loss' has shape \\(2,\\)"):
    metrics.flatten_scalars({"loss": jnp.ones(2)})


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_prints_step_metrics_and_eta_every_interval(capsys):
  clock = _Clock()
  progress = metrics.Progress("GRPO", 10, console_secs=30.0, clock=clock)
  progress(1, {"reward/total": 0.5, "kl": 0.01})
  assert capsys.readouterr().out.splitlines() == ["== GRPO: step 1 of 10 =="]
  clock.now = 10.0
  progress(2, {"reward/total": 0.6})
  assert capsys.readouterr().out == ""  # within the interval: quiet
  clock.now = 40.0
  progress(3, {"reward/total": 0.7, "reward/accuracy": 0.25, "kl": 0.01})
  # 40 s for steps 2..3 (the first step, with its compilation, not counted): 20 s/step, 7 to go.
  assert capsys.readouterr().out.strip() == (
      "GRPO 3/10 (30%): reward 0.7, accuracy 0.25, KL 0.01; 20.00 s/step, ETA 2m20s")
  clock.now = 50.0
  progress(10, {})  # the last step always reports
  assert capsys.readouterr().out.strip().startswith("GRPO 10/10 (100%): ")


def test_progress_stops_after_consecutive_nonfinite_updates(tmp_path):
  from jigsaw_jax.runtime import checkpoint as ckpt_lib
  import jax.numpy as jnp
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, {"w": jnp.ones(2)}, force=True)
    progress = metrics.Progress("GRPO", 100, checkpointer=ckpt, max_nonfinite=3,
                                    console_secs=1e9)
    bad = {"skipped_update": 1.0, "loss": float("nan"), "grad_norm": float("inf"), "kl": 0.0}
    progress(3, bad)
    progress(4, {"skipped_update": 0.0, "loss": 1.0})  # a good step resets the count
    progress(5, bad)
    progress(6, bad)
    with pytest.raises(metrics.NonFiniteTrainingError,
                       match=r"step 7: 3 updates in a row.*grad_norm, loss.*step 2 in"):
      progress(7, bad)


def test_eval_table_has_a_row_per_set():
  table = metrics.eval_table([
      dict(step=4, size="2x1", question_type="full", think=False, accuracy=0.5, format_rate=1.0,
           n=8)])
  lines = table.splitlines()
  assert len(lines) == 2 and lines[1].split() == ["4", "2x1", "full", "False", "greedy",
                                                  "50.0%", "100.0%", "8"]
