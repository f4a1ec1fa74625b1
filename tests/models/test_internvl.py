"""InternVL against transformers' InternVLForConditionalGeneration, processor and save layout.

Each model is built tiny and random in transformers, saved with save_pretrained and loaded by our
loader; logits, greedy generation, tiling, prompts and the exported state dict must all agree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jigsaw_jax.models import hf_io, mllm, presets
from jigsaw_jax.models.internvl import processing as internvl_processing
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig
from jigsaw_jax.models.processing import PromptBatch, left_pad
from tests.models.test_mllm import randomize

TOL = 1e-4
VOCAB, START, END, CONTEXT = 300, 288, 289, 290
TILE, TOKENS_PER_TILE = 56, 4  # 56-pixel tiles of 14-pixel patches: 4x4 -> 2x2 tokens

# The two InternViT variants transformers implements: 300M-style (LayerNorm, q/k/v biases, no
# final norm, tied head) and 6B-style (RMSNorm, QK-norm, no biases, a final LayerNorm, untied).
VARIANTS = {
    "vit300m": dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False,
                    use_mean_pooling=True, tie=True),
    "vit6b": dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True,
                  use_mean_pooling=False, tie=False),
}


def hf_internvl(norm_type, attention_bias, use_qk_norm, use_mean_pooling, tie, seed=0):
  cfg = transformers.InternVLConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, image_size=TILE, patch_size=14,
                         norm_type=norm_type, attention_bias=attention_bias,
                         use_qk_norm=use_qk_norm, use_mean_pooling=use_mean_pooling),
      text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
      image_token_id=CONTEXT, image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = randomize(transformers.InternVLForConditionalGeneration(cfg).eval(), seed)
  with torch.no_grad():  # randomize() leaves the layer scales near 1 like weights; keep them O(1)
    for layer in model.model.vision_tower.encoder.layer:
      layer.lambda_1.uniform_(0.5, 1.5)
      layer.lambda_2.uniform_(0.5, 1.5)
  return model


def make_batch(rows, seed=0):
  """rows: per row a list of items, an int (that many text tokens) or ('image', tiles).

  Returns left-padded ids and mask [B, L], pixel_values [tiles, C*H*W] and the grids (tiles, 1, 1).
  """
  rng = np.random.RandomState(seed)
  seqs, grids = [], []
  for items in rows:
    seq = []
    for item in items:
      if isinstance(item, int):
        seq += list(rng.randint(0, 280, item))
      else:
        grids.append((item[1], 1, 1))
        seq += [START] + [CONTEXT] * (TOKENS_PER_TILE * item[1]) + [END]
    seqs.append(np.array(seq))
  ids, mask = left_pad(seqs, pad_id=0)
  tiles = sum(g[0] for g in grids)
  pixels = rng.randn(tiles, 3 * TILE * TILE).astype(np.float32)
  return ids, mask, pixels, tuple(grids)


def hf_logits(model, ids, mask, pixels, positions):
  kwargs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  if len(pixels):
    kwargs["pixel_values"] = torch.tensor(pixels.reshape(-1, 3, TILE, TILE))
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      model = hf_internvl(**VARIANTS[name])
      directory = tmp_path_factory.mktemp(name)
      model.save_pretrained(directory)
      params, cfg = hf_io.load_hf(directory)
      cache[name] = (model, directory, params, cfg)
    return cache[name]

  return get


CASES = {
    # One image of 3 tiles (2 + thumbnail); the second row is left-padded with a 1-tile image.
    "vit300m_tiles_padded": ("vit300m", [[3, ("image", 3), 4], [2, ("image", 1), 1]]),
    # Two images in one row (2 and 5 tiles) and a text-only row.
    "vit6b_two_images_and_text_row": ("vit6b", [[2, ("image", 2), 3, ("image", 5), 2], [7]]),
    "vit300m_text_only": ("vit300m", [[9], [4]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(built, case):
  variant, rows = CASES[case]
  model, _, params, cfg = built(variant)
  ids, mask, pixels, grids = make_batch(rows)
  index = mllm.rope_index(cfg, ids, grids, mask)
  out = mllm.VisionLanguageModel(cfg).apply(
      params, jnp.asarray(ids), index.positions, jnp.asarray(mask),
      jnp.asarray(pixels) if grids else None, grids or None)
  # transformers' generate passes these ids (attention_mask.cumsum - 1): 1-D RoPE over real tokens.
  ref = hf_logits(model, ids, mask, pixels, index.positions[0])
  real = mask.astype(bool)
  diff = np.abs(np.asarray(out.logits) - ref)[real].max()
  print(f"{case}: max |dlogits| = {diff:.3e}")
  assert diff < TOL, f"{case}: max |dlogits| = {diff:.2e}"
  assert np.abs(ref[real]).max() > 1.0  # Not a comparison of near-zero numbers.


def test_image_features_change_the_logits(built):
  """The vision path is live: other pixels, other logits at the text after the image."""
  _, _, params, cfg = built("vit300m")
  ids, mask, pixels, grids = make_batch([[2, ("image", 3), 4]])
  index = mllm.rope_index(cfg, ids, grids, mask)
  apply = lambda px: np.asarray(mllm.VisionLanguageModel(cfg).apply(
      params, ids, index.positions, mask, px, grids).logits[0, -1])
  assert np.abs(apply(pixels) - apply(pixels[::-1].copy())).max() > 1e-2


def test_greedy_generation_matches_transformers_generate(built):
  model, _, params, cfg = built("vit6b")
  ids, mask, pixels, grids = make_batch([[3, ("image", 3), 4], [2, ("image", 1), 1]], seed=3)
  new = 6
  sampler = Sampler(cfg, RolloutConfig(max_new_tokens=new, group_size=1, eos_ids=(),
                                       sampling=SamplingConfig(greedy=True)))
  ours = sampler.generate(params, PromptBatch(ids, mask, pixels, np.asarray(grids, np.int32)),
                          jax.random.key(0))
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         pixel_values=torch.tensor(pixels.reshape(-1, 3, TILE, TILE)),
                         do_sample=False, max_new_tokens=new, min_new_tokens=new,
                         eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours.tokens), ref[:, ids.shape[1]:].numpy())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_round_trips_the_state_dict(built, tmp_path, variant):
  model, directory, params, cfg = built(variant)
  hf_io.save_hf(params, cfg, tmp_path)
  original, exported = load_file(str(directory / "model.safetensors")), load_file(
      str(tmp_path / "model.safetensors"))
  assert sorted(exported) == sorted(original)  # the layout save_pretrained writes
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  again, cfg_again = hf_io.load_hf(tmp_path)
  assert cfg_again == cfg
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # And transformers reads the export as the same model.
  reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, mask, pixels, grids = make_batch([[2, ("image", 2), 3]])
  positions = mllm.rope_index(cfg, ids, grids, mask).positions[0]
  np.testing.assert_array_equal(hf_logits(reloaded, ids, mask, pixels, positions),
                                hf_logits(model, ids, mask, pixels, positions))


def test_missing_and_misshaped_tensors_are_named(built, tmp_path):
  _, directory, _, _ = built("vit300m")
  tensors = load_file(str(directory / "model.safetensors"))
  del tensors["vision_tower.encoder.layer.1.lambda_2"]
  tensors["multi_modal_projector.linear_1.weight"] = np.zeros((64, 100), np.float32)
  tensors["vision_tower.extra.weight"] = np.zeros((3,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  with pytest.raises(hf_io.CheckpointError) as error:
    hf_io.load_hf(tmp_path)
  message = str(error.value)
  assert "missing tensor vision_tower.encoder.layer.1.lambda_2" in message
  assert "multi_modal_projector.linear_1.weight has shape (64, 100), expected (64, 128)" in message
  assert "unexpected tensor vision_tower.extra.weight" in message


# ---------------------------------------------------------------------------------------------
# Processing: tiles and prompts.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 600), (517, 233), (120, 90), (1000, 1000)])
def test_tiles_equal_transformers_image_processor(size):
  # The PIL backend (the torchvision one needs torchvision), with InternVL-hf's settings.
  hf = transformers.GotOcr2ImageProcessorPil(
      size={"height": 448, "width": 448}, image_mean=list(internvl_processing.IMAGENET_MEAN),
      image_std=list(internvl_processing.IMAGENET_STD), crop_to_patches=True, min_patches=1,
      max_patches=12)
  image = np.random.RandomState(sum(size)).randint(0, 256, size + (3,)).astype(np.uint8)
  ref = hf(images=[image], return_tensors="np")
  ours = internvl_processing.preprocess_image(image)
  assert ours.shape[0] == int(ref["num_patches"][0]) == internvl_processing.num_tiles(*size)
  np.testing.assert_array_equal(ours, ref["pixel_values"].reshape(ours.shape[0], -1))


class _ImagesOnlyInternVLProcessor(transformers.InternVLProcessor):
  """transformers' InternVLProcessor without a video processor (that one needs torchvision,
  which is not installed; images never reach it)."""

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument is not None:
      super().check_argument_for_proper_class(argument_name, argument)


def test_prompt_tokens_equal_transformers_internvl_processor():
  """Our processor on the tiny tokenizer (whose template writes <img><IMG_CONTEXT></img> with
  Qwen's stand-ins) == transformers' InternVLProcessor replacing each <IMG_CONTEXT>."""
  cfg = presets.get_preset("internvl_tiny")
  ours = internvl_processing.processor_for(cfg)
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      str(ours.tokenizer.name_or_path), extra_special_tokens={
          "start_image_token": "<|vision_start|>", "context_image_token": "<|image_pad|>",
          "end_image_token": "<|vision_end|>", "video_token": "<|video_pad|>"})
  image_processor = transformers.GotOcr2ImageProcessorPil(
      size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=12,
      image_mean=list(internvl_processing.IMAGENET_MEAN),
      image_std=list(internvl_processing.IMAGENET_STD))
  hf = _ImagesOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     image_seq_length=cfg.vision.tokens_per_tile)
  rng = np.random.RandomState(0)
  images = [rng.randint(0, 256, (150, 90, 3)).astype(np.uint8),
            rng.randint(0, 256, (60, 200, 3)).astype(np.uint8)]
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Two:"},
                                           {"type": "image"}, {"type": "text", "text": "ok?"}]}]
  encoded = ours(messages, images)
  text = ours.render_chat(messages).replace("<|vision_start|><|image_pad|><|vision_end|>",
                                            "<|image_pad|>")
  ref = hf(text=[text], images=images, return_tensors="np")
  np.testing.assert_array_equal(encoded.input_ids, ref["input_ids"][0])
  np.testing.assert_array_equal(encoded.pixel_values,
                                ref["pixel_values"].reshape(len(encoded.pixel_values), -1))
  tiles = [internvl_processing.num_tiles(*im.shape[:2], ours.tiling) for im in images]
  np.testing.assert_array_equal(encoded.image_grid_thw, [(t, 1, 1) for t in tiles])
  assert (encoded.input_ids == cfg.image_token_id).sum() == sum(tiles) * 4


# ---------------------------------------------------------------------------------------------
# Presets and configs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["internvl3_2b", "internvl_tiny"])
def test_preset_config_round_trips_through_transformers(name):
  cfg = presets.get_preset(name)
  hf = hf_io.hf_config_from_model_config(cfg)
  assert isinstance(hf, transformers.InternVLConfig)
  assert hf.image_seq_length == cfg.vision.tokens_per_tile
  assert hf_io.model_config_from_hf(hf.to_dict()) == cfg


def test_real_preset_size():
  # OpenGVLab/InternVL3-2B's bf16 model.safetensors is 4.18 GB: 2.09B parameters.
  assert presets.count_params("internvl3_2b") == 2_088_957_440
  assert presets.get_preset("internvl3_2b").vision.tokens_per_tile == 256


def test_every_parameter_has_logical_axes():
  import flax.linen as nn
  boxed = mllm.abstract_params(presets.get_preset("internvl_tiny"))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 50
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"parameter without logical axis names: {leaf}"
    assert len(leaf.names) == len(leaf.value.shape)


def test_unsupported_language_model_is_refused():
  hf = hf_io.hf_config_from_model_config(presets.get_preset("internvl_tiny")).to_dict()
  hf["text_config"]["model_type"] = "qwen3"
  with pytest.raises(ValueError, match="qwen3"):
    hf_io.model_config_from_hf(hf)


def test_tiny_preset_initialises_and_runs_a_tiled_prompt():
  cfg = presets.get_preset("internvl_tiny")
  params = mllm.init_params(cfg, jax.random.key(0))
  proc = internvl_processing.processor_for(cfg)
  prompt = proc.encode_prompt("Which piece is first?",
                              np.zeros((84, 168, 3), np.uint8) + 100)
  grids = tuple(map(tuple, prompt.image_grid_thw.tolist()))
  # 4x2 tiles (aspect 2, as 2x1; the 14112 pixels exceed half the 4x2 canvas, 12544, so the
  # larger grid wins the tie) + the thumbnail.
  assert grids == ((9, 1, 1),)
  ids, mask = prompt.input_ids[None], np.ones((1, len(prompt.input_ids)), np.int32)
  index = mllm.rope_index(cfg, ids, grids, mask)
  out = mllm.VisionLanguageModel(cfg).apply(params, ids, index.positions, mask,
                                            prompt.pixel_values, grids)
  assert out.logits.shape == (1, ids.shape[1], cfg.text.vocab_size)
  assert np.isfinite(np.asarray(out.logits)).all()


def test_export_of_tiny_preset_passes_the_parity_check_with_its_processor(tmp_path):
  """Ours (random internvl_tiny) -> HF directory with the tiny tokenizer and tile settings ->
  `python -m jigsaw_jax.models.parity`'s check builds the prompt with our InternVL processor
  from those files and transformers agrees."""
  import json
  from jigsaw_jax.models import parity, tokenizer
  cfg = presets.get_preset("internvl_tiny")
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32),
                        mllm.init_params(cfg, jax.random.key(0)))
  hf_io.save_hf(params, cfg, tmp_path, copy_files_from=tokenizer.tiny_tokenizer_path())
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(
      image_processor_type="GotOcr2ImageProcessor", size=dict(height=TILE, width=TILE),
      min_patches=1, max_patches=12, resample=3, image_mean=list(internvl_processing.IMAGENET_MEAN),
      image_std=list(internvl_processing.IMAGENET_STD))))
  (tmp_path / "processor_config.json").write_text(json.dumps(dict(image_seq_length=4)))
  assert "tiling" in parity.build_inputs(tmp_path, cfg).source
  assert parity.compare(tmp_path, verbose=False) < TOL


def test_lora_adapted_policy_merges_and_exports_to_transformers(built, tmp_path):
  """A LoRA on the InternVL decoder: zero effect at init; trained (here: random) it changes the
  logits, and its merged export is what transformers computes."""
  from jigsaw_jax.models import adapters
  _, _, params, cfg = built("vit300m")
  adapted = dataclasses.replace(cfg, adapter=adapters.AdapterConfig(kind="lora", rank=4))
  lora = mllm.init_adapters(adapted, jax.random.key(1))
  ids, mask, pixels, grids = make_batch([[3, ("image", 3), 4], [2, ("image", 1), 1]])
  index = mllm.rope_index(cfg, ids, grids, mask)
  forward = lambda c, v: np.asarray(mllm.VisionLanguageModel(c).apply(
      v, ids, index.positions, mask, pixels, grids).logits)
  base = forward(cfg, params)
  np.testing.assert_array_equal(forward(adapted, adapters.join(lora, params)), base)
  leaves, tree = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  lora = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])
  variables = adapters.join(lora, params)
  ours = forward(adapted, variables)
  assert np.abs(ours - base).max() > 1e-2
  merged = adapters.merge_adapters(variables, adapted)
  plain = forward(cfg, merged)
  # Folding the LoRA into the kernels rounds differently in float32.
  assert np.abs(plain - ours).max() < 1e-5 * np.abs(ours).max()
  hf_io.save_hf(merged, cfg, tmp_path)
  reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ref = hf_logits(reloaded, ids, mask, pixels, index.positions[0])
  assert np.abs(plain - ref)[mask.astype(bool)].max() < TOL


# ---------------------------------------------------------------------------------------------
# It trains: GRPO steps and an evaluation of the `:tiny` jigsaw config with the InternVL preset.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_jigsaw_config_runs_grpo_steps_and_eval_with_internvl(tmp_path):
  import os
  import subprocess
  import sys
  from tests.rl.test_resume import _scalars
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  steps = 2
  command = [
      sys.executable, "-m", "jigsaw_jax.main", "--config=configs/jigsaw_2x1.py:tiny",
      f"--workdir={tmp_path}", "--config.model.preset=internvl_tiny",
      f"--config.total_steps={steps}", "--config.pretrain.steps=0",
      "--config.eval.at_start=False", "--config.eval.at_end=True", "--config.eval.num_puzzles=4",
      "--config.eval.batch_size=4", "--config.data.pipeline.prompts_per_batch=2",
      "--config.data.pipeline.group_size=4", "--config.rollout.max_new_tokens=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-4000:]
  scalars = _scalars(str(tmp_path))
  for tag in ("loss", "grad_norm", "reward/total", "completion/length_tokens"):
    assert sorted(scalars[tag]) == list(range(1, steps + 1)), tag
    assert all(np.isfinite(v) for v in scalars[tag].values()), tag
  assert all(1 <= v <= 4 for v in scalars["completion/length_tokens"].values())
  # The evaluator sampled every held-out size (its records; the console no longer logs scalars).
  with open(os.path.join(tmp_path, "eval.json")) as f:
    records = json.load(f)
  assert {(r["size"], r["step"]) for r in records} == {(s, steps) for s in ("2x1", "1x2", "3x1")}
  assert all(r["n"] == 4 for r in records)
