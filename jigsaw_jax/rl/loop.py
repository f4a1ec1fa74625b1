"""The thin training loop shared by GRPO and Proxy-RLHF: step, metrics, checkpoint, eval.

    state, last_metrics = run_steps(config, step_fn, state, data_iter, ckpt, writer, "GRPO",
                                    evaluate)

`step_fn(state, batches, rng, timer) -> (state, metrics, records)` is a task's step unit
(`GrpoStep`, `ProxyStep`); `records` says what it trained on (`puzzles`, `texts`, `scores`,
`rewards` of the groups kept, `generated_tokens`). Step i's key is fold_in(state['rng'], i), so a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from absl import logging
import jax

from jigsaw_jax.runtime import metrics as metrics_lib


def run_steps(config, step_fn: Callable, state: Dict[str, Any], data_iter: Iterator, ckpt,
              writer, phase: str, evaluate: Optional[Callable[[int, Any], Any]] = None
              ) -> Tuple[Dict[str, Any], Dict[str, float]]:
  """Runs the steps after `state['step']` up to `config.total_steps`: each step's metrics go to
  the writer every `config.metrics.log_every` steps, samples every `samples_every`, a
  checkpoint (with the data position) after every step whose update was finite, and
  `evaluate(step, state)` every `config.eval.every_steps` (the last step's evaluation is the caller's)."""
  start_step = int(state["step"])
  total_steps = int(config.total_steps)
  group = int(config.data.pipeline.group_size)
  # Console progress under `phase`; a run whose updates stay non-finite stops, naming the last
  # good checkpoint.
  report_progress = metrics_lib.create_report_progress(
      writer, total_steps, phase=phase, checkpointer=ckpt,
      max_nonfinite=config.optim.max_nonfinite_updates)
  timer = metrics_lib.StepTimer(report_progress)
  last_metrics: Dict[str, float] = {}
  for step in range(start_step + 1, total_steps + 1):
    state, step_metrics, records = step_fn(state, data_iter,
                                           jax.random.fold_in(state["rng"], step), timer)
    timer.add_tokens(records.generated_tokens)
    finite = step_metrics["skipped_update"] == 0.0
    if not finite:
      logging.warning("step %d: non-finite gradient; the update was skipped.", step)
    last_metrics = {**step_metrics, **timer.finish_step()}
    if step % int(config.metrics.log_every) == 0 or step == total_steps:
      metrics_lib.write_scalars(writer, step, last_metrics)
    if config.metrics.samples_every and step % int(config.metrics.samples_every) == 0:
      metrics_lib.write_samples(
          writer, step, [p.prompt for p in records.puzzles for _ in range(group)], records.texts,
          {k: v.reshape(-1) for k, v in records.scores.items()})
    report_progress(step, last_metrics)
    if finite:
      ckpt.save(step, state, data_state=data_iter.get_state(),
                metadata={"step": step, "reward": float(records.rewards.mean())},
                force=step == total_steps)
    if evaluate is not None and config.eval.every_steps and \
        step % config.eval.every_steps == 0 and step != total_steps:
      evaluate(step, state)
  ckpt.wait_until_finished()
  return state, last_metrics
