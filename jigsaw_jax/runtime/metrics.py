"""Training metrics: clu writers (TensorBoard event files), sample tables and step timing.

Everything goes through one clu `MetricWriter`, so the same calls log to TensorBoard files in the
workdir on process 0 and only to the text log on the other processes (one event file per run,
not per host). Values may be JAX arrays; they are fetched here, once per write.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from clu import metric_writers, periodic_actions


def create_writer(workdir: str, *, just_logging: Optional[bool] = None,
                  asynchronous: bool = True) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir` (plus the text log); only logging off process 0."""
  if just_logging is None:
    just_logging = jax.process_index() > 0
  return metric_writers.create_default_writer(workdir, just_logging=just_logging,
                                              asynchronous=asynchronous)


# The metrics a progress line shows when a step reports them: (metric name, label).
PROGRESS_METRICS = (("reward/total", "reward"), ("reward/accuracy", "accuracy"), ("kl", "KL"),
                    ("loss", "loss"), ("sft/loss", "loss"), ("proxy/accept_rate", "accept"))


class NonFiniteTrainingError(FloatingPointError):
  """Updates stayed non-finite: the run stops rather than train on with NaN losses."""


def console(text: str) -> None:
  """A line for the person watching the run (process 0 only), whatever the log verbosity."""
  if jax.process_index() == 0:
    print(text, flush=True)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _finite_value(value: Any) -> Optional[float]:
  try:
    array = np.asarray(jax.device_get(value))
  except TypeError:
    return None
  return float(array.reshape(())) if array.size == 1 else None


class Progress(periodic_actions.ReportProgress):
  """clu's progress hook (steps/s and uptime to the writer, timed phases) plus a console line
  every `console_secs`: step/total, the key metrics, s/step and an ETA; and a stop when updates
  stay non-finite.

  Call it as `progress(step, metrics)` after every step. A step whose metrics say
  `skipped_update` (its gradient was NaN/Inf and the update was refused) counts; after
  `max_nonfinite` in a row it raises NonFiniteTrainingError naming the step, the metrics that
  went non-finite and the last good checkpoint.
  """

  def __init__(self, phase: str, num_train_steps: int, writer=None, *,
               console_secs: float = 30.0, checkpointer: Any = None, max_nonfinite: int = 0,
               every_steps: Optional[int] = None, every_secs: Optional[float] = 60.0,
               clock: Callable[[], float] = time.monotonic):
    # every_steps / every_secs: how often clu writes steps_per_sec and uptime.
    super().__init__(num_train_steps=num_train_steps, writer=writer, every_steps=every_steps,
                     every_secs=every_secs)
    self.phase, self.console_secs, self.clock = phase, float(console_secs), clock
    self.checkpointer, self.max_nonfinite = checkpointer, int(max_nonfinite)
    self.nonfinite_in_a_row = 0
    self._first: Optional[tuple[int, float]] = None
    self._last_print = -float("inf")

  def __call__(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> bool:
    now = self.clock()
    if self._first is None:
      # The first step includes compilation: its time would make a wild first ETA.
      self._first, self._last_print = (step, now), now
      console(f"== {self.phase}: step {step} of {self._num_train_steps} ==")
    metrics = dict(metrics or {})
    self._check_finite(step, metrics)
    if now - self._last_print >= self.console_secs or step == self._num_train_steps:
      self._last_print = now
      console(self.line(step, metrics, now))
    return super().__call__(step)

  def line(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
    # Timed from the first report on, so the first step's compilation does not skew the ETA.
    first_step, started = self._first
    if step > first_step:
      per_step = (now - started) / (step - first_step)
    else:
      per_step = None
    parts = []
    for name, label in PROGRESS_METRICS:
      value = _finite_value(metrics[name]) if name in metrics else None
      if value is not None:
        parts.append(f"{label} {value:.4g}")
    total = self._num_train_steps
    timing = "timing after the next step"
    if per_step is not None and np.isfinite(per_step):
      timing = f"{per_step:.2f} s/step, ETA {_duration(per_step * max(total - step, 0))}"
    return (f"{self.phase} {step}/{total} ({100 * step / max(total, 1):.0f}%): "
            + ", ".join(parts) + ("; " if parts else "") + timing)

  def _check_finite(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not metrics.get("skipped_update"):
      self.nonfinite_in_a_row = 0
      return
    self.nonfinite_in_a_row += 1
    if not self.max_nonfinite or self.nonfinite_in_a_row < self.max_nonfinite:
      return
    bad = sorted(k for k, v in metrics.items()
                 if (x := _finite_value(v)) is not None and not np.isfinite(x))
    where = "no checkpoint was saved yet"
    if self.checkpointer is not None:
      self.checkpointer.wait_until_finished()
      latest = self.checkpointer.latest_step()
      if latest is not None:
        where = f"the last good checkpoint is step {latest} in {self.checkpointer.directory}"
    raise NonFiniteTrainingError(
        f"{self.phase} stopped at step {step}: {self.nonfinite_in_a_row} updates in a row were "
        f"non-finite and skipped (non-finite: {', '.join(bad) or 'the gradient'}); {where}. "
        "Lower config.optim.learning_rate (or raise config.optim.max_nonfinite_updates) and "
        "run the same command again to resume from it.")


def create_report_progress(writer: Optional[metric_writers.MetricWriter], num_train_steps: int,
                           *, phase: str = "training", checkpointer: Any = None,
                           max_nonfinite: int = 0, console_secs: float = 30.0,
                           every_steps: Optional[int] = None,
                           every_secs: Optional[float] = 60.0) -> Progress:
  """The loops' progress hook (`Progress`): call it as `report_progress(step, metrics)`."""
  return Progress(phase, num_train_steps, writer, console_secs=console_secs,
                  checkpointer=checkpointer, max_nonfinite=max_nonfinite,
                  every_steps=every_steps, every_secs=every_secs)


def flatten_scalars(scalars: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Nested dicts -> {"a/b": float}; None values (a metric this step did not compute) dropped."""
  flat = {}
  for key, value in scalars.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_scalars(value, name + "/"))
    elif value is not None:
      array = np.asarray(jax.device_get(value))
      if array.size != 1:
        raise ValueError(f"Metric {name!r} has shape {array.shape}; scalars must have one "
                         "element. Reduce it (mean/sum) before writing.")
      flat[name] = float(array.reshape(()))
  return flat


def write_scalars(writer: metric_writers.MetricWriter, step: int,
                  scalars: Mapping[str, Any]) -> dict[str, float]:
  """Writes one step's scalars (nested dicts become `a/b` tags); returns what was written."""
  flat = flatten_scalars(scalars)
  if flat:
    writer.write_scalars(step, flat)
  return flat


def _cell(value: Any, max_chars: int) -> str:
  if isinstance(value, (float, np.floating)):
    text = f"{float(value):.3f}"
  else:
    text = str(value)
  if len(text) > max_chars:
    text = text[:max_chars - 1] + "…"
  # Markdown tables break on pipes and newlines inside cells.
  return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(columns: Mapping[str, Sequence[Any]], *, max_rows: int = 8,
                   max_chars: int = 400) -> str:
  """A markdown table, one column per entry, rows truncated to `max_rows` and cells to
  `max_chars` characters (completions can be 512 tokens; TensorBoard renders the markdown)."""
  lengths = {len(values) for values in columns.values()}
  if len(lengths) > 1:
    raise ValueError(f"Table columns differ in length: "
                     f"{ {k: len(v) for k, v in columns.items()} }.")
  n = min(lengths.pop() if lengths else 0, max_rows)
  names = ["#", *columns]
  lines = ["| " + " | ".join(_cell(c, max_chars) for c in names) + " |",
           "|" + "|".join(["---"] * len(names)) + "|"]
  for i in range(n):
    row = [str(i)] + [_cell(values[i], max_chars) for values in columns.values()]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def samples_table(prompts: Sequence[str], completions: Sequence[str],
                  rewards: Mapping[str, Sequence[float]], *, max_rows: int = 8,
                  max_chars: int = 400) -> str:
  """Prompts, completions and each reward component side by side (`rewards` maps the
  component name, e.g. "accuracy", "format", "total", to one value per completion)."""
  columns = {"prompt": list(prompts), "completion": list(completions)}
  columns.update({f"reward/{name}": list(np.asarray(jax.device_get(values)).reshape(-1))
                  for name, values in rewards.items()})
  return markdown_table(columns, max_rows=max_rows, max_chars=max_chars)


def write_samples(writer: metric_writers.MetricWriter, step: int, prompts: Sequence[str],
                  completions: Sequence[str], rewards: Mapping[str, Sequence[float]], *,
                  tag: str = "samples", max_rows: int = 8, max_chars: int = 400) -> str:
  """Writes the samples table as a text summary under `tag`; returns the markdown."""
  table = samples_table(prompts, completions, rewards, max_rows=max_rows, max_chars=max_chars)
  writer.write_texts(step, {tag: table})
  return table


def write_config(writer: metric_writers.MetricWriter, config: Any, step: int = 0) -> None:
  """The run's config as a text summary, so a TensorBoard curve carries its settings."""
  text = str(config)  # ConfigDict's str is plain YAML (to_yaml adds python object tags)
  writer.write_texts(step, {"config": "```\n" + text + "\n```"})


class StepTimer:
  """Splits each step's wall time into named phases and turns token counts into tokens/s.

    timer = StepTimer(report_progress)
    with timer.phase("rollout"):
      completions = jax.block_until_ready(sampler(...))
    with timer.phase("reward"):
      rewards = score(...)
    with timer.phase("update"):
      state, metrics = jax.block_until_ready(update(state, batch))
    timer.add_tokens(num_generated_tokens)
    write_scalars(writer, step, {**metrics, **timer.finish_step()})

  JAX dispatches asynchronously: block on a phase's outputs inside it, or its device time is
  billed to whichever later phase waits first. With a `ReportProgress`, each phase is also one
  of its timed parts, so the progress log shows the split too.
  """

  def __init__(self, report_progress: Optional[periodic_actions.ReportProgress] = None, *,
               clock: Callable[[], float] = time.perf_counter):
    self._report_progress = report_progress
    self._clock = clock
    self._reset()

  def _reset(self) -> None:
    self._phases: dict[str, float] = collections.defaultdict(float)
    self._tokens = 0
    self._start: Optional[float] = None

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Times the block as phase `name` (repeated phases in one step add up)."""
    outer = (self._report_progress.timed(name, wait_jax_async_dispatch=False)
             if self._report_progress is not None else contextlib.nullcontext())
    with outer:
      start = self._clock()
      if self._start is None:
        self._start = start
      try:
        yield
      finally:
        self._phases[name] += self._clock() - start

  def add_tokens(self, count: int) -> None:
    """Counts tokens processed this step (generated, or prompt + generated: say which in the
    metric's name if it matters)."""
    self._tokens += int(count)

  def finish_step(self) -> dict[str, float]:
    """This step's `time/<phase>_s`, `time/other_s`, `time/step_s` and `perf/tokens_per_s`.

    A step runs from the previous `finish_step` (the first one from its first phase) to this
    call, so `time/other_s` is what no phase covered: input pipeline, logging, checkpointing.
    """
    end = self._clock()
    total = end - self._start if self._start is not None else 0.0
    out = {f"time/{name}_s": seconds for name, seconds in self._phases.items()}
    out["time/other_s"] = max(total - sum(self._phases.values()), 0.0)
    out["time/step_s"] = total
    if total > 0:
      out["perf/tokens_per_s"] = self._tokens / total
    self._reset()
    self._start = end
    return out


def eval_table(records: Sequence[Mapping[str, Any]]) -> str:
  """Eval records as a small aligned table for the console: one row per test set."""
  header = ("step", "size", "question", "think", "decoding", "accuracy", "format", "n")
  rows = [header] + [(str(r["step"]), r["size"], r["question_type"], str(r["think"]),
                      r.get("decoding", "greedy"), f"{100 * r['accuracy']:.1f}%",
                      f"{100 * r['format_rate']:.1f}%", str(r["n"])) for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


class NullTimer:
  """A StepTimer stand-in that times nothing (steps called outside a training loop)."""

  def phase(self, name: str):
    del name
    return contextlib.nullcontext()


NO_TIMER = NullTimer()
