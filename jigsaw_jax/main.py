"""The entry point: `python -m jigsaw_jax.main --config=configs/<exp>.py[:args] --workdir=DIR`.

`config.task` picks what runs. Overrides use `--config.a.b=value`; a misspelt key is an error that
lists the valid keys.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jigsaw_jax import configlib
from jigsaw_jax.runtime import run_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")

# task name -> "module:function"; each function takes (config, workdir). Imported lazily so that a
# task's heavy dependencies load only when that task runs.
TASKS = {
    "preview": "jigsaw_jax.puzzles.preview:run_from_config",
    "grpo": "jigsaw_jax.rl.trainer:train_and_evaluate",
    "sft": "jigsaw_jax.rl.sft:train",
    "eval": "jigsaw_jax.evaluate:run",
    "proxy": "jigsaw_jax.rl.proxy_trainer:train",
    "export": "jigsaw_jax.export:export",
}


def describe_from_runs(config, explicit=()) -> None:
  """Fills in what `config` leaves to the run it restores or starts from (that run's saved
  config.json), keeping the keys the command line set (`explicit`)."""
  source = config.restore.workdir if config.task in ("eval", "export") else ""
  keys = run_config.FROM_RESTORED_RUN
  if not source and config.get("init_from"):
    source, keys = config.init_from, run_config.FROM_INIT_RUN
  saved = run_config.load(source) if source else None
  if saved is not None:
    changed = run_config.inherit(config, saved, keys, explicit)
    if changed:
      logging.info("From %s: %s.", os.path.join(source, run_config.FILENAME), ", ".join(changed))


def run(config, workdir: str, explicit=()):
  if config.task not in TASKS:
    raise ValueError(f"Unknown config.task {config.task!r}; expected one of {sorted(TASKS)}.")
  describe_from_runs(config, explicit)
  run_config.save_first(workdir, config)
  module_name, function_name = TASKS[config.task].split(":")
  return getattr(importlib.import_module(module_name), function_name)(config, workdir)


def _parse_flags(argv):
  try:
    configlib.check_overrides(argv[1:])
  except KeyError as e:
    sys.exit(f"error: {e.args[0]}")
  return flags.FLAGS(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the directory for outputs and checkpoints.")
  logging.info("config:\n%s", _CONFIG.value)
  run(_CONFIG.value, _WORKDIR.value, configlib.explicit_keys(sys.argv[1:]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
