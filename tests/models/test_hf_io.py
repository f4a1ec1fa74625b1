"""HF checkpoints in and out: exact round trips, exports transformers runs, clear refusals."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jigsaw_jax.models import hf_io, mllm, parity, presets, tokenizer
from jigsaw_jax.models.config import ModelConfig, TextConfig, VisionConfig
from tests.models.test_mllm import hf_qwen2_5_vl, hf_qwen2_vl

TOL = 1e-4


def _tensors(directory) -> dict:
  out = {}
  for file in sorted(pathlib.Path(directory).glob("*.safetensors")):
    out.update(load_file(str(file)))
  return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Directories written by transformers' save_pretrained: Qwen2.5-VL (tied) and Qwen2-VL."""
  q25 = tmp_path_factory.mktemp("q25")
  hf_qwen2_5_vl(window_size=56, fullatt=(1,), depth=2, tie=True).save_pretrained(q25)
  q2 = tmp_path_factory.mktemp("q2vl")
  hf_qwen2_vl(tie=False).save_pretrained(q2)
  return {"q25": q25, "q2vl": q2}


def _copy(directory, tmp_path) -> pathlib.Path:
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return target


def _rewrite(directory, edit) -> None:
  """Applies edit(dict of tensors) to the directory's model.safetensors."""
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Round trips and exports.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q25", "q2vl"])
def test_hf_to_ours_to_hf_is_byte_exact(saved, tmp_path, kind):
  params, cfg = hf_io.load_hf(saved[kind])
  hf_io.save_hf(params, cfg, tmp_path)
  before, after = _tensors(saved[kind]), _tensors(tmp_path)
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape
    assert before[name].tobytes() == after[name].tobytes(), name
  assert hf_io.model_config_from_hf(hf_io.read_config(tmp_path)) == cfg


def test_transformers_in_memory_names_are_accepted(saved, tmp_path):
  """model.language_model.* / model.visual.* (the module names in transformers >= 4.52)."""
  directory = _copy(saved["q25"], tmp_path)

  def rename(tensors):
    for name in list(tensors):
      new = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") \
          else "model." + name if name.startswith("visual.") else name
      tensors[new] = tensors.pop(name)

  _rewrite(directory, rename)
  assert any(k.startswith("model.language_model.") for k in _tensors(directory))
  a, _ = hf_io.load_hf(saved["q25"])
  b, _ = hf_io.load_hf(directory)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _random_params(cfg: ModelConfig, seed: int = 0):
  """Init params plus noise: non-trivial norms and biases, so every tensor matters."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32),
                      mllm.init_params(cfg, jax.random.key(seed)))


def test_export_of_tiny_preset_runs_in_transformers_with_same_logits(tmp_path):
  """Ours -> HF directory (with the tiny tokenizer) -> transformers: the parity check passes,
  using the directory's tokenizer and chat template to build the prompt."""
  cfg = presets.get_preset("tiny")
  hf_io.save_hf(_random_params(cfg), cfg, tmp_path, copy_files_from=tokenizer.tiny_tokenizer_path())
  assert (tmp_path / "tokenizer.json").is_file()
  assert "tokenizer" in parity.build_inputs(tmp_path, cfg).source
  assert parity.compare(tmp_path, verbose=False) < TOL


def test_export_of_qwen2_vl_runs_in_transformers_with_same_logits(tmp_path):
  cfg = ModelConfig(
      text=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, mrope_section=(2, 3, 3),
                      tie_word_embeddings=False),
      vision=VisionConfig(kind="qwen2_vl", depth=2, hidden_size=32, intermediate_size=64,
                          num_heads=2, out_hidden_size=64, fullatt_block_indexes=(),
                          hidden_act="quick_gelu"),
      image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
  hf_io.save_hf(_random_params(cfg), cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
  assert parity.compare(tmp_path, verbose=False) < TOL


def test_sharded_export_loads_back_and_in_transformers(saved, tmp_path):
  params, cfg = hf_io.load_hf(saved["q25"])
  hf_io.save_hf(params, cfg, tmp_path, max_shard_bytes=100_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
  again, _ = hf_io.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert parity.compare(tmp_path, verbose=False) < TOL  # transformers reads the shards too


def test_bfloat16_export(saved, tmp_path):
  params, cfg = hf_io.load_hf(saved["q25"])
  hf_io.save_hf(params, cfg, tmp_path, dtype="bfloat16")
  with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  bf16, cfg16 = hf_io.load_hf(tmp_path, param_dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(jnp.bfloat16), b),
               params, bf16)


def test_each_tensor_is_placed_with_its_sharding(saved):
  _, cfg = hf_io.load_hf(saved["q25"])
  mesh = jax.make_mesh((1,), ("fsdp",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: sharding, nn.unbox(mllm.abstract_params(cfg)))
  params, _ = hf_io.load_hf(saved["q25"], shardings=shardings)
  assert all(x.sharding == sharding for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Refusals.
# ---------------------------------------------------------------------------------------------


def test_missing_config_is_refused(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  (directory / "config.json").unlink()
  with pytest.raises(hf_io.CheckpointError, match="no config.json"):
    hf_io.load_hf(directory)


def test_missing_tensor_is_refused_by_name(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  _rewrite(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf_io.CheckpointError,
                     match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(shape \(96, 64\)"):
    hf_io.load_hf(directory)


def test_unexpected_tensor_is_refused_by_name(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  _rewrite(directory, lambda t: t.update({"visual.blocks.9.attn.qkv.weight":
                                          np.zeros((3, 3), np.float32)}))
  with pytest.raises(hf_io.CheckpointError,
                     match=r"unexpected tensor visual\.blocks\.9\.attn\.qkv\.weight"):
    hf_io.load_hf(directory)


def test_misshaped_tensor_is_refused_with_both_shapes(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  _rewrite(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias":
                                          np.zeros((31,), np.float32)}))
  with pytest.raises(hf_io.CheckpointError) as err:
    hf_io.load_hf(directory)
  message = str(err.value)
  assert "model.layers.0.self_attn.k_proj.bias has shape (31,), expected (32,)" in message
  assert "fix config.json" in message


def test_config_that_does_not_describe_the_weights_is_refused(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  config = json.loads((directory / "config.json").read_text())
  config["text_config"]["num_hidden_layers"] = 3
  del config["text_config"]["layer_types"]
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match=r"missing tensor model\.layers\.2\."):
    hf_io.load_hf(directory)


def test_invalid_config_is_refused(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  config = json.loads((directory / "config.json").read_text())
  config["text_config"]["num_hidden_layers"] = 3  # disagrees with its own layer_types
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match="transformers cannot read"):
    hf_io.load_hf(directory)


def test_pickled_weights_are_never_loaded(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
  with pytest.raises(hf_io.CheckpointError, match="never load"):
    hf_io.load_hf(directory)


def test_untied_head_in_a_tied_config_is_refused(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  _rewrite(directory, lambda t: t.update({"lm_head.weight": np.ones((300, 64), np.float32)}))
  with pytest.raises(hf_io.CheckpointError, match="tie_word_embeddings"):
    hf_io.load_hf(directory)


def test_tied_head_equal_to_embedding_is_accepted(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  _rewrite(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  hf_io.load_hf(directory)


def test_wrong_model_type_is_refused(saved, tmp_path):
  directory = _copy(saved["q25"], tmp_path)
  config = json.loads((directory / "config.json").read_text())
  config["model_type"] = "llava"
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match="model_type 'llava'"):
    hf_io.load_hf(directory)


# ---------------------------------------------------------------------------------------------
# The parity command.
# ---------------------------------------------------------------------------------------------


def test_parity_cli_on_a_save_pretrained_directory(saved):
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
  run = subprocess.run([sys.executable, "-m", "jigsaw_jax.models.parity", "--hf",
                        str(saved["q2vl"])], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "max |Δlogits|" in run.stdout and "PASS" in run.stdout


def test_parity_exit_status_above_tolerance(saved):
  assert parity.main(["--hf", str(saved["q25"])]) == 0
  assert parity.main(["--hf", str(saved["q25"]), "--tol", "-1"]) == 1
