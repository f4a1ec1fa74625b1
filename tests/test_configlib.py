"""Config variants and override errors."""

import subprocess
import sys

import ml_collections
import pytest

from jigsaw_jax import configlib


def _config():
  return ml_collections.ConfigDict({"seed": 0, "model": {"preset": "tiny", "lr": 1e-3}})


def test_parse_arg_words_and_fields():
  words, fields = configlib.parse_arg("tiny, think,seed=3,model.preset=small")
  assert words == ["tiny", "think"]
  assert fields == {"seed": 3, "model.preset": "small"}


def test_apply_fields_sets_nested_keys():
  config = _config()
  configlib.apply_fields(config, {"model.lr": 0.5})
  assert config.model.lr == 0.5


def test_misspelt_key_lists_valid_keys_and_suggests():
  with pytest.raises(KeyError) as e:
    configlib.resolve(_config(), "model.pres")
  message = e.value.args[0]
  assert "Unknown config key 'model.pres'" in message
  assert "Did you mean model.preset" in message
  assert "Valid keys: model.lr, model.preset, seed" in message


def test_main_refuses_a_misspelt_override(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "jigsaw_jax.main", "--config=configs/preview.py",
       f"--workdir={tmp_path}", "--config.preview.sizez=('2x1',)"],
      capture_output=True, text=True)
  assert done.returncode != 0
  assert "Unknown config key 'preview.sizez'" in done.stderr
  assert "Did you mean preview.sizes" in done.stderr
