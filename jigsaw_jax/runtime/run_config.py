"""A run describes itself: its resolved config, saved as `<workdir>/config.json` at first start.

Tasks that use another run (`task=eval` and `task=export` on `restore.workdir`, `init_from`) read
from it how that run's model was built (preset or checkpoint, adapter, prompt style, image
settings), so a command need not restate them; a key the user set explicitly still wins.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import ml_collections

from jigsaw_jax import configlib

FILENAME = "config.json"

# What a task that evaluates or exports another run takes from that run's config: everything that
# decides the parameters' shapes and what the model sees (the prompt wording, the image size,
# the rollout's length); the task's own choices (which sizes to test, how many puzzles) stay.
FROM_RESTORED_RUN = ("model", "adapter", "data", "rollout", "eval.max_new_tokens",
                     "eval.prompt_bucket", "checkpoint.subdir")
# What a run started from another (`init_from`) takes: the model, and how its prompts look.
FROM_INIT_RUN = ("model", "data.pipeline.puzzle.prompt_style", "data.source.image_size",
                 "data.pipeline.resize_to")


def save_first(workdir: str, config: ml_collections.ConfigDict) -> Optional[str]:
  """Writes `<workdir>/config.json` unless a previous start did; returns its path when written.

  Only the first start's config is kept: a resumed run is described by how it began.
  """
  path = os.path.join(workdir, FILENAME)
  if os.path.exists(path):
    return None
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(path + ".tmp", path)
  return path


def load(run_workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config a run saved at its first start; None for a run that saved none."""
  path = os.path.join(run_workdir, FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use (mesh rules stay lists of lists: see below)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _like(current: Any, saved: Any) -> Any:
  """`saved` in the container type the current config holds (lists stay lists)."""
  if isinstance(current, list) and isinstance(saved, tuple):
    return [_like(current[0] if current else None, v) for v in saved]
  return saved


def _is_under(key: str, prefixes: Iterable[str]) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def inherit(config: ml_collections.ConfigDict, run: ml_collections.ConfigDict,
            keys: Iterable[str], explicit: Iterable[str] = ()) -> list[str]:
  """Copies the run's values under `keys` into `config` in place, except keys the user set
  (`explicit`, and everything under them); returns the keys that changed."""
  keys, explicit = tuple(keys), tuple(explicit)
  current_keys = set(configlib.flat_keys(config))
  changed = []
  with config.unlocked():
    for key in configlib.flat_keys(run):
      if key not in current_keys or not _is_under(key, keys) or _is_under(key, explicit):
        continue
      parent, leaf = configlib.resolve(config, key)
      saved, current = run[key.split(".")[0]], getattr(parent, leaf)
      for part in key.split(".")[1:]:
        saved = saved[part]
      saved = _like(current, saved)
      if saved != current:
        parent[leaf] = saved
        changed.append(key)
  return changed
