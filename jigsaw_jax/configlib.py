"""Helpers for experiment configs: `file.py:arg` variants and friendly override errors.

Config files define `get_config(arg: str | None) -> ml_collections.ConfigDict`. The argument is a
comma-separated list: bare words pick presets (`tiny`, `small`), `key=value` pairs set fields,
e.g. `configs/jigsaw_2x1.py:tiny,seed=3`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from typing import Iterable, Optional

import ml_collections


def parse_arg(arg: Optional[str]) -> tuple[list[str], dict[str, object]]:
  """Splits a config argument into (preset words, {key: literal value})."""
  words, fields = [], {}
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if "=" in token:
      key, value = token.split("=", 1)
      try:
        fields[key.strip()] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        fields[key.strip()] = value
    else:
      words.append(token)
  return words, fields


def apply_fields(config: ml_collections.ConfigDict, fields: dict[str, object]) -> None:
  """Sets dotted keys, refusing unknown ones with the list of valid keys."""
  for key, value in fields.items():
    parent, leaf = resolve(config, key)
    setattr(parent, leaf, value)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key as a dotted path."""
  keys = []
  for name, value in config.items():
    path = f"{prefix}{name}"
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, path + "."))
    else:
      keys.append(path)
  return keys


def resolve(config: ml_collections.ConfigDict, dotted: str):
  """(parent ConfigDict, leaf name) of an existing dotted key, or a KeyError that lists the
  valid keys and the closest matches."""
  parts = dotted.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = flat_keys(config)
      close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise KeyError(
          f"Unknown config key '{dotted}'.{hint} Valid keys: {', '.join(sorted(valid))}")
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `--config=` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path!r}: expected a Python file.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_overrides(argv: Iterable[str], flag_name: str = "config") -> None:
  """Raises KeyError for the first `--config.a.b=v` override naming a key the config lacks."""
  argv = list(argv)
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag_name}=")), None)
  if spec is None:
    return
  config = load_config_file(spec)
  for a in argv:
    if a.startswith(f"--{flag_name}."):
      resolve(config, a[len(flag_name) + 3:].split("=", 1)[0])


def explicit_keys(argv: Iterable[str], flag_name: str = "config") -> list[str]:
  """The dotted keys a command line sets itself: `--config.a.b=v` overrides and the `key=value`
  fields of `--config=file.py:arg` (preset words such as `tiny` set whole groups and are not
  counted)."""
  keys = []
  for a in argv:
    if a.startswith(f"--{flag_name}="):
      keys += list(parse_arg(a.split("=", 1)[1].partition(":")[2])[1])
    elif a.startswith(f"--{flag_name}."):
      keys.append(a[len(flag_name) + 3:].split("=", 1)[0])
  return keys
