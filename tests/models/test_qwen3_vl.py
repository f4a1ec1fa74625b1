"""Qwen3-VL against transformers' Qwen3VLForConditionalGeneration on tiny random checkpoints.

Each checkpoint is built by transformers from a tiny Qwen3VLConfig, saved with save_pretrained
and loaded by our loader: the M-RoPE index, the logits (one image, several images, a text-only
row, left padding), greedy decoding and the HF round trip must all agree with transformers.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jigsaw_jax.models import hf_io, mllm, presets, rope
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.models.qwen3_vl import hf as qwen3_vl_hf
from jigsaw_jax.models.qwen3_vl import vision as qwen3_vision
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig
from tests.models.test_hf_io import _copy, _rewrite, _tensors
from tests.models.test_mllm import IMAGE, VIDEO, START, END, VOCAB, hf_forward, make_batch, \
    our_forward, randomize

TOL = 1e-4
_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
            vision_end_token_id=END)


def hf_qwen3_vl(tie: bool, deepstack=(0, 1), depth: int = 3, layers: int = 3, seed: int = 0):
  """A tiny Qwen3-VL: head_dim (24) unequal to hidden / heads (16), a 4x4 learned position table
  that every image's grid resamples, patches of 14 pixels (make_batch's)."""
  cfg = transformers.Qwen3VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            mrope_section=[4, 4, 4], mrope_interleaved=True),
                       bos_token_id=None, eos_token_id=None),
      vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=64, patch_size=14, num_position_embeddings=16,
                         deepstack_visual_indexes=list(deepstack)),
      tie_word_embeddings=tie, **_IDS)
  torch.manual_seed(seed)
  return randomize(transformers.Qwen3VLForConditionalGeneration(cfg).eval(), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{name: (transformers model, its save_pretrained directory)}."""
  out = {}
  for name, kwargs in {"tied": dict(tie=True), "untied": dict(tie=False, deepstack=(2, 0))}.items():
    model = hf_qwen3_vl(**kwargs)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    out[name] = (model, directory)
  return out


CASES = {
    # One non-square image, a second (padded) row with another image; tied head, DeepStack into
    # decoder layers 0 and 1.
    "one_image_per_row": ("tied", [[3, (1, 8, 12), 4], [2, (1, 12, 4), 1]]),
    # Two images in a row (resampled from the same 4x4 table to different grids), a text-only row;
    # untied head and DeepStack indexes out of order (block 2 feeds decoder layer 0).
    "two_images_and_text_row": ("untied", [[2, (1, 4, 4), 3, (1, 8, 6), 2], [7]]),
    "three_images": ("tied", [[1, (1, 6, 6), (1, 2, 10), 2, (1, 10, 2), 1]]),
    "text_only": ("untied", [[9], [4]]),
}
MEASURED = {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_and_logits_match_transformers(saved, case):
  name, rows = CASES[case]
  model, directory = saved[name]
  params, cfg = hf_io.load_hf(directory)
  ids, mask, pixels, grids = make_batch(rows)
  ours, index = our_forward(params, cfg, ids, mask, pixels, grids)

  ref_pos, ref_delta = model.model.get_rope_index(
      torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      image_grid_thw=torch.tensor(grids) if grids else None, attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(index.positions, ref_pos.numpy())
  np.testing.assert_array_equal(index.deltas, ref_delta.numpy().reshape(-1))

  ref = hf_forward(model, ids, mask, pixels, grids)
  real = mask.astype(bool)
  diff = float(np.abs(np.asarray(ours.logits) - ref)[real].max())
  MEASURED[case] = diff
  print(f"{case}: max |Δlogits| = {diff:.3e}")
  assert diff < TOL, f"{case}: max |Δlogits| = {diff:.2e}"
  assert np.abs(ref[real]).max() > 1.0  # The comparison is not between near-zero numbers.


def test_deepstack_changes_the_logits(saved):
  """Without its DeepStack features the model is a different function: the injection is live."""
  model, directory = saved["tied"]
  params, cfg = hf_io.load_hf(directory)
  ids, mask, pixels, grids = make_batch(CASES["one_image_per_row"][1])
  ours, _ = our_forward(params, cfg, ids, mask, pixels, grids)
  index = mllm.rope_index(cfg, ids, grids, mask)
  module = mllm.VisionLanguageModel(cfg)

  def without_deepstack(m):
    features = m.visual(pixels, grids)
    embeds = mllm.scatter_image_features(m.decoder.embed(ids), ids == IMAGE, features.merged)
    return m.decoder(embeds, index.positions, mask).logits

  plain = module.apply(params, method=without_deepstack)
  assert np.abs(np.asarray(plain) - np.asarray(ours.logits))[mask.astype(bool)].max() > 0.1


def test_interleaved_mrope_matches_transformers_rotary_embedding():
  text = transformers.Qwen3VLTextConfig(
      hidden_size=64, num_attention_heads=4, head_dim=24,
      rope_parameters=dict(rope_type="default", rope_theta=500.0, mrope_section=[4, 4, 4],
                           mrope_interleaved=True))
  reference = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(text)
  positions = np.random.RandomState(0).randint(0, 50, (3, 2, 7))
  cos_ref, sin_ref = reference(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  cos, sin = rope.rope_cos_sin(positions, 24, 500.0, (4, 4, 4), interleaved=True)
  np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
  np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)
  assert rope.mrope_axes((4, 4, 4), True).tolist() == [0, 1, 2] * 4
  assert rope.mrope_axes((6, 5, 5), True).tolist() == [0, 1, 2] * 5 + [0]


def test_position_table_resampling_matches_torch_interpolate():
  """The taps reproduce F.interpolate(bilinear, align_corners=True) of the learned table."""
  side, grid = 5, ((1, 6, 10), (1, 2, 2))
  table = torch.randn(side * side, 3)
  index, weight = qwen3_vision.interpolation_taps(grid, side, merge=2)
  ours = (table.numpy()[index] * weight[..., None]).sum(1)
  start = 0
  for _, h, w in grid:
    image = table.T.reshape(1, 3, side, side)
    ref = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)
    ref = ref[0].permute(1, 2, 0).numpy()  # [h, w, 3], raster order
    ref = ref.reshape(h // 2, 2, w // 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 3)  # blocks
    np.testing.assert_allclose(ours[start:start + h * w], ref, atol=1e-5)
    start += h * w


def test_greedy_decoding_equals_transformers_generate(saved):
  model, directory = saved["untied"]
  params, cfg = hf_io.load_hf(directory)
  ids, mask, pixels, grids = make_batch([[3, (1, 8, 12), 4], [2, (1, 4, 4), 5, (1, 4, 8)], [6]])
  new_tokens = 10
  with torch.no_grad():
    expected = model.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
  expected = expected[:, ids.shape[1]:].numpy()
  sampler = Sampler(cfg, RolloutConfig(max_new_tokens=new_tokens, group_size=1, eos_ids=(),
                                       sampling=SamplingConfig(greedy=True), pad_id=0))
  batch = PromptBatch(ids.astype(np.int32), mask.astype(np.int32), pixels,
                      np.asarray(grids, np.int32))
  ours = sampler.generate(params, batch, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
  assert len(set(expected[:, 0].tolist())) > 1 or len(set(expected[0].tolist())) > 1


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_hf_to_ours_to_hf_is_byte_exact(saved, tmp_path, name):
  _, directory = saved[name]
  params, cfg = hf_io.load_hf(directory)
  hf_io.save_hf(params, cfg, tmp_path)
  before, after = _tensors(directory), _tensors(tmp_path)
  assert sorted(before) == sorted(after)
  assert any(k.startswith("model.language_model.") for k in after)  # Qwen3-VL's own layout
  for key in before:
    assert before[key].dtype == after[key].dtype and before[key].shape == after[key].shape
    assert before[key].tobytes() == after[key].tobytes(), key
  assert hf_io.model_config_from_hf(hf_io.read_config(tmp_path)) == cfg


def test_export_of_tiny_preset_runs_in_transformers_with_same_logits(tmp_path):
  cfg = presets.get_preset("qwen3_vl_tiny")
  params = mllm.init_params(cfg, jax.random.key(3))
  hf_io.save_hf(params, cfg, tmp_path)
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  rng = np.random.RandomState(0)
  grids = ((1, 4, 6),)
  n = 4 * 6 // 4
  row = list(rng.randint(0, 1000, 4)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + \
      [cfg.vision_end_token_id] + list(rng.randint(0, 1000, 3))
  ids, mask = np.array([row]), np.ones((1, len(row)), np.int64)
  pixels = rng.randn(24, 3 * 2 * 16 * 16).astype(np.float32)
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))
  with torch.no_grad():
    ref = model(**kwargs).logits.numpy()
  index = mllm.rope_index(cfg, ids, grids, mask)
  ours = mllm.VisionLanguageModel(cfg).apply(params, ids, index.positions, mask, pixels, grids)
  assert np.abs(np.asarray(ours.logits) - ref).max() < TOL


def test_missing_tensor_is_refused_by_its_name_in_the_file(saved, tmp_path):
  directory = _copy(saved["tied"][1], tmp_path)
  _rewrite(directory, lambda t: (t.pop("model.language_model.layers.1.self_attn.q_norm.weight"),
                                 t.pop("model.visual.deepstack_merger_list.1.norm.bias")))
  with pytest.raises(hf_io.CheckpointError) as err:
    hf_io.load_hf(directory)
  message = str(err.value)
  assert "missing tensor model.language_model.layers.1.self_attn.q_norm.weight (shape (24,))" \
      in message
  assert "missing tensor model.visual.deepstack_merger_list.1.norm.bias (shape (128,))" in message


def test_misshaped_and_unexpected_tensors_are_refused_by_name(saved, tmp_path):
  directory = _copy(saved["tied"][1], tmp_path)
  _rewrite(directory, lambda t: t.update({
      "model.visual.pos_embed.weight": np.zeros((25, 32), np.float32),
      "model.visual.deepstack_merger_list.2.norm.weight": np.zeros((128,), np.float32)}))
  with pytest.raises(hf_io.CheckpointError) as err:
    hf_io.load_hf(directory)
  message = str(err.value)
  assert "model.visual.pos_embed.weight has shape (25, 32), expected (16, 32)" in message
  assert "unexpected tensor model.visual.deepstack_merger_list.2.norm.weight" in message


def test_presets_are_the_published_shapes():
  """Sizes of the released checkpoints, counted from shapes alone (nothing allocated)."""
  counts = {name: presets.count_params(name)
            for name in ("qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b")}
  assert 2.0e9 < counts["qwen3_vl_2b"] < 2.3e9
  assert 4.2e9 < counts["qwen3_vl_4b"] < 4.6e9
  assert 8.5e9 < counts["qwen3_vl_8b"] < 8.9e9
  for name in counts:  # Each preset survives the trip through a transformers config.
    cfg = presets.get_preset(name)
    hf = qwen3_vl_hf.hf_config_from_model_config(cfg)
    assert hf_io.model_config_from_hf(json.loads(hf.to_json_string())) == cfg


@pytest.mark.slow
def test_tiny_jigsaw_config_runs_grpo_steps_with_the_qwen3_vl_policy(tmp_path):
  """`configs/jigsaw_2x1.py:tiny,model.preset=qwen3_vl_tiny`: two GRPO steps through the real
  trainer (sampler, scoring with the shared prompt cache, update) with a finite, non-zero
  gradient."""
  from configs import jigsaw_2x1
  from jigsaw_jax.rl import rollout_rewards
  from jigsaw_jax.rl.grpo import train as trainer
  noise = np.random.RandomState(0)

  def score_texts(puzzles, texts, group):  # A random policy scores 0 everywhere: add noise.
    scores = rollout_rewards.score_texts(puzzles, texts, group)
    scores["total"] = scores["total"] + noise.rand(*scores["total"].shape).astype(np.float32)
    return scores

  c = jigsaw_2x1.get_config("tiny,model.preset=qwen3_vl_tiny")
  c.total_steps = 2
  c.pretrain.steps = 0
  c.eval.at_start = c.eval.at_end = False
  c.checkpoint.async_save = False
  c.data.pipeline.prompts_per_batch = 2
  c.data.pipeline.group_size = 2
  c.rollout.max_new_tokens = 4
  metrics = trainer.train_and_evaluate(c, str(tmp_path), rewards=score_texts)
  assert np.isfinite(metrics["loss"]) and metrics["skipped_update"] == 0.0
  assert metrics["grad_norm"] > 0


def test_qwen3_vl_image_settings_preprocess_like_transformers(tmp_path):
  """Qwen3-VL checkpoints' preprocessor_config.json (16-pixel patches, mean = std = 0.5, pixel
  bounds as a size dict): our patches and grid equal transformers' image processor's."""
  from jigsaw_jax.models import processing
  settings = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
              "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
              "image_processor_type": "Qwen2VLImageProcessorFast"}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
  ours_cfg = processing.ImageProcessingConfig.from_pretrained(tmp_path)
  assert (ours_cfg.patch_size, ours_cfg.min_pixels, ours_cfg.image_mean) == (16, 65536, (0.5,) * 3)
  hf = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  image = np.random.RandomState(0).randint(0, 256, (300, 410, 3)).astype(np.uint8)
  pixels, grid = processing.preprocess_image(image, ours_cfg)
  ref = hf(images=[image], return_tensors="np")
  np.testing.assert_array_equal(np.asarray(grid).reshape(-1), ref["image_grid_thw"].reshape(-1))
  np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5)


def test_parity_command_on_a_qwen3_vl_directory(saved):
  from jigsaw_jax.models import parity
  diff = parity.compare(saved["untied"][1], verbose=False)
  assert diff < TOL
  assert parity.main(["--hf", str(saved["untied"][1]), "--tol", "-1"]) == 1


def test_every_parameter_has_logical_axes():
  import flax.linen as nn
  boxed = mllm.abstract_params(presets.get_preset("qwen3_vl_tiny"))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  names = {"/".join(str(k.key) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
  assert any("deepstack_1" in n for n in names) and any("q_norm" in n for n in names)
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"parameter without logical axis names: {leaf}"
    assert len(leaf.names) == len(leaf.value.shape)


# Qwen/Qwen3-VL-4B-Instruct's config.json as released (transformers 4.57 layout: rope_scaling,
# rope_theta beside it, the vision config's old model_type).
QWEN3_VL_4B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                         "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True,
        "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4096, "model_type": "qwen3_vl", "num_heads": 16,
        "num_position_embeddings": 2304, "out_hidden_size": 2560, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def test_released_4b_config_reads_as_the_4b_preset():
  assert hf_io.model_config_from_hf(QWEN3_VL_4B_CONFIG) == presets.get_preset("qwen3_vl_4b")
