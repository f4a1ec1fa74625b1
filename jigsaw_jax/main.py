"""The entry point: `python -m jigsaw_jax.main --config=configs/<exp>.py[:args] --workdir=DIR`.

`config.task` picks what runs. Overrides use `--config.a.b=value`; a misspelt key is an error that
lists the valid keys.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jigsaw_jax import configlib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")

# task name -> "module:function"; each function takes (config, workdir). Imported lazily so that a
# task's heavy dependencies load only when that task runs.
TASKS = {
    "preview": "jigsaw_jax.puzzles.preview:run_from_config",
    "grpo": "jigsaw_jax.rl.grpo.train:train_and_evaluate",
    "sft": "jigsaw_jax.sft.train:train",
    "eval": "jigsaw_jax.evaluate:run",
    "proxy": "jigsaw_jax.rl.proxy.train:train",
}


def run(config, workdir: str):
  if config.task not in TASKS:
    raise ValueError(f"Unknown config.task {config.task!r}; expected one of {sorted(TASKS)}.")
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
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
