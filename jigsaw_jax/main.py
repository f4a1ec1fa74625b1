"""The entry point: `python -m jigsaw_jax.main --config=configs/<exp>.py[:args] --workdir=DIR`.

`config.task` picks what runs. Overrides use `--config.a.b=value`; a misspelt key is an error that
lists the valid keys.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

# TensorFlow (imported by clu's writers) prints INFO lines from C++ unless told before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
import yaml
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
    "grpo": "jigsaw_jax.rl.grpo.train:train_and_evaluate",
    "sft": "jigsaw_jax.sft.train:train",
    "eval": "jigsaw_jax.eval.evaluate:run",
    "proxy": "jigsaw_jax.rl.proxy.train:train",
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
      print(f"From {os.path.join(source, run_config.FILENAME)}: {', '.join(changed)}.")


def run(config, workdir: str, explicit=()):
  if config.task not in TASKS:
    raise ValueError(f"Unknown config.task {config.task!r}; expected one of {sorted(TASKS)}.")
  describe_from_runs(config, explicit)
  run_config.save_first(workdir, config)
  print(f"config ({config.task}, workdir {workdir}):\n{config_yaml(config)}", flush=True)
  module_name, function_name = TASKS[config.task].split(":")
  return getattr(importlib.import_module(module_name), function_name)(config, workdir)


def _parse_flags(argv):
  try:
    configlib.check_overrides(argv[1:])
  except KeyError as e:
    sys.exit(f"error: {e.args[0]}")
  return flags.FLAGS(argv)


def config_yaml(config) -> str:
  """The config as plain, readable YAML (sorted keys, tuples as lists)."""
  return yaml.safe_dump(json.loads(config.to_json_best_effort()), sort_keys=True,
                        default_flow_style=None, width=100)


def check_workdir(workdir: str) -> None:
  """Exits with one line when --workdir cannot hold the run's outputs."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    sys.exit(f"error: --workdir={workdir!r} cannot be used: {e.strerror or e}. Pass a directory "
             "this user can create and write.")


def _verbosity_given(argv) -> bool:
  return any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the directory for outputs and checkpoints.")
  # Libraries (Orbax, absl, clu) log at INFO by the hundred; the console shows our progress lines
  # and warnings unless --verbosity=0 (INFO) or 1 (DEBUG) asks for theirs.
  if not _verbosity_given(sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  check_workdir(_WORKDIR.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, configlib.explicit_keys(sys.argv[1:]))
  except FloatingPointError as e:  # a diverged run: the message says where and what to do
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
