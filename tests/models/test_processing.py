"""Text + image processing against transformers' Qwen2-VL image processor and Qwen2.5-VL processor.

transformers' torchvision image processor and AutoProcessor cannot be built here (no torchvision);
the PIL image processor is the same algorithm, and an image-only Qwen2_5_VLProcessor subclass gives
the reference token ids.
"""

import functools
import glob
import importlib.resources
import json
import pathlib
import unicodedata

import hypothesis
import hypothesis.strategies as st
import numpy as np
import PIL.Image
import pytest
import tokenizers
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from jigsaw_jax.models import build_tiny_tokenizer
from jigsaw_jax.models import processing
from jigsaw_jax.models import tokenizer as tokenizer_lib

# Qwen2.5-VL-3B-Instruct's preprocessor_config.json.
QWEN25_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
PROMPT = "Solve this 2x1 jigsaw puzzle.\n\n```\n1\n2\n```\n\nDirectly output the final answer."


def _image(height, width, seed=0, channels=3):
  rng = np.random.default_rng(seed)
  # Smooth content plus noise, so that resampling errors would show.
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                   ((x + y) % 256)], axis=-1)
  noisy = base + rng.integers(-40, 40, size=(height, width, 3))
  image = np.clip(noisy, 0, 255).astype(np.uint8)
  if channels == 4:
    alpha = rng.integers(0, 256, size=(height, width, 1)).astype(np.uint8)
    image = np.concatenate([image, alpha], axis=-1)
  return image


def _hf_image_processor(config: processing.ImageProcessingConfig):
  return hf_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=config.patch_size,
      merge_size=config.merge_size, temporal_patch_size=config.temporal_patch_size,
      image_mean=list(config.image_mean), image_std=list(config.image_std))


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer():
  return tokenizer_lib.load_tokenizer(None)


@pytest.fixture(name="tiny_tokenizer")
def tiny_tokenizer_fixture():
  return _tiny_tokenizer()


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(height=st.integers(1, 5000), width=st.integers(1, 5000),
                  min_pixels=st.sampled_from([3136, 100 * 28 * 28]),
                  max_pixels=st.sampled_from([64 * 28 * 28, 1003520, 12845056]))
def test_smart_resize_matches_transformers_and_respects_bounds(height, width, min_pixels,
                                                                max_pixels):
  hypothesis.assume(max(height, width) / min(height, width) <= 200)
  hypothesis.assume(min_pixels < max_pixels)
  ours = processing.smart_resize(height, width, 28, min_pixels, max_pixels)
  assert ours == hf_qwen2_vl.smart_resize(height, width, 28, min_pixels, max_pixels)
  h, w = ours
  assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
  if max(height, width) / min(height, width) <= 4:
    assert min_pixels <= h * w <= max_pixels


def test_smart_resize_refuses_extreme_aspect_ratio():
  with pytest.raises(ValueError, match="aspect ratio"):
    processing.smart_resize(10, 2500)


@pytest.mark.parametrize(
    "height,width,max_pixels",
    [
        (56, 56, 12845056),  # Already a multiple of 28: resize is the identity.
        (100, 150, 12845056),  # Non-square, rounded to 112x140.
        (427, 640, 12845056),  # A COCO-sized photo at native resolution.
        (333, 97, 12845056),  # Tall and odd-sized.
        (20, 35, 12845056),  # Smaller than min_pixels: upscaled.
        (480, 300, 64 * 28 * 28),  # Larger than max_pixels: downscaled.
    ])
def test_preprocess_image_matches_transformers(height, width, max_pixels):
  config = processing.ImageProcessingConfig(max_pixels=max_pixels)
  image = _image(height, width)
  pixel_values, grid_thw = processing.preprocess_image(image, config)
  reference = _hf_image_processor(config)(images=[image], return_tensors="np")
  assert pixel_values.dtype == np.float32
  np.testing.assert_array_equal(grid_thw[None], reference["image_grid_thw"])
  np.testing.assert_allclose(pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)
  t, h, w = grid_thw
  assert pixel_values.shape == (t * h * w, config.patch_dim)


@pytest.mark.parametrize("shape", [(90, 70), (90, 70, 1), (90, 70, 4)])
def test_grey_and_rgba_images_convert_like_transformers(shape):
  config = processing.ImageProcessingConfig()
  image = _image(90, 70, seed=1, channels=4 if shape[-1] == 4 else 3)
  image = image[..., 0].reshape(shape) if len(shape) == 2 or shape[-1] == 1 else image
  pixel_values, _ = processing.preprocess_image(image, config)
  # transformers takes single-channel and RGBA images as PIL images.
  hf_input = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  reference = _hf_image_processor(config)(images=[hf_input], return_tensors="np")
  np.testing.assert_allclose(pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)


def test_patch_rows_are_merge_window_major():
  """Row r holds patch (r // 4 → window, r % 4 → position in the 2x2 window), frame repeated."""
  config = processing.ImageProcessingConfig()
  image = np.arange(56 * 84, dtype=np.float32).reshape(56, 84, 1).repeat(3, axis=-1)
  pixel_values, grid = processing.patchify(image, config)
  np.testing.assert_array_equal(grid, [1, 4, 6])
  rows = pixel_values.reshape(4 * 6, 3, 2, 14, 14)
  np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])  # Temporal copies.
  for r in range(24):
    window, inner = divmod(r, 4)
    ph = (window // 3) * 2 + inner // 2
    pw = (window % 3) * 2 + inner % 2
    np.testing.assert_array_equal(rows[r, 0, 0], image[ph * 14:(ph + 1) * 14,
                                                       pw * 14:(pw + 1) * 14, 0])


def test_num_image_tokens_counts_merged_patches():
  config = processing.ImageProcessingConfig()
  _, grid = processing.preprocess_image(_image(427, 640), config)
  assert processing.num_image_tokens(427, 640, config) == np.prod(grid) // 4


def test_bad_image_inputs_say_what_was_expected():
  with pytest.raises(TypeError, match="uint8"):
    processing.preprocess_image(np.zeros((56, 56, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    processing.preprocess_image(np.zeros((56, 56, 2), np.uint8))


# ---------------------------------------------------------------------------------------------
# Image settings from a checkpoint directory.
# ---------------------------------------------------------------------------------------------


def test_config_reads_qwen25_vl_preprocessor_config_like_transformers(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_PREPROCESSOR))
  ours = processing.ImageProcessingConfig.from_pretrained(tmp_path)
  assert ours == processing.ImageProcessingConfig()  # Our defaults are Qwen2.5-VL's.
  hf = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  assert isinstance(hf, hf_qwen2_vl.Qwen2VLImageProcessorPil)
  assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
  assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (
      hf.patch_size, hf.merge_size, hf.temporal_patch_size)
  np.testing.assert_allclose(ours.image_mean, hf.image_mean)
  np.testing.assert_allclose(ours.image_std, hf.image_std)


def test_config_reads_size_dict_and_processor_config(tmp_path):
  nested = {"image_processor": {"size": {"shortest_edge": 1024, "longest_edge": 4096},
                                "patch_size": 16}}
  (tmp_path / "processor_config.json").write_text(json.dumps(nested))
  config = processing.ImageProcessingConfig.from_pretrained(tmp_path)
  assert (config.min_pixels, config.max_pixels, config.patch_size) == (1024, 4096, 16)


def test_config_refuses_missing_or_unsupported_settings(tmp_path):
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    processing.ImageProcessingConfig.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="resample"):
    processing.ImageProcessingConfig.from_hf_dict({"resample": 2})
  with pytest.raises(ValueError, match="do_normalize"):
    processing.ImageProcessingConfig.from_hf_dict({"do_normalize": False})


# ---------------------------------------------------------------------------------------------
# The tiny tokenizer.
# ---------------------------------------------------------------------------------------------


def test_tiny_tokenizer_ships_as_package_data():
  directory = importlib.resources.files("jigsaw_jax").joinpath(tokenizer_lib.TINY_TOKENIZER_DIR)
  assert directory.joinpath("tokenizer.json").is_file()
  assert directory.joinpath("tokenizer_config.json").is_file()
  assert pathlib.Path(str(directory)) == tokenizer_lib.tiny_tokenizer_path()
  # setup.py's package_data pattern picks these files up.
  package = pathlib.Path(processing.__file__).resolve().parents[1]
  shipped = {pathlib.Path(p).name for p in glob.glob(str(package / "assets/**/*"), recursive=True)}
  assert {"tokenizer.json", "tokenizer_config.json"} <= shipped


def test_tiny_tokenizer_loads_with_auto_tokenizer_and_has_qwen_special_tokens(tiny_tokenizer):
  hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_lib.tiny_tokenizer_path()))
  assert len(hf) == len(tiny_tokenizer) == 1024
  first = len(tiny_tokenizer) - len(tokenizer_lib.QWEN2_VL_ADDED_TOKENS)
  for offset, (token, special) in enumerate(tokenizer_lib.QWEN2_VL_ADDED_TOKENS):
    assert tiny_tokenizer.convert_tokens_to_ids(token) == first + offset  # Qwen's order.
    assert (token in tiny_tokenizer.all_special_tokens) == special
  assert tiny_tokenizer.eos_token == "<|im_end|>"
  assert tiny_tokenizer.pad_token == "<|endoftext|>"
  ids = tokenizer_lib.special_token_ids(tiny_tokenizer)
  assert (ids.image_pad, ids.im_end, ids.pad) == (first + 12, first + 2, first)
  assert ids.eos_ids == (first + 2, first)


def test_tiny_tokenizer_splits_numbers_into_single_digits(tiny_tokenizer):
  digit_ids = [tiny_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
  for d, token_id in enumerate(digit_ids):
    assert tiny_tokenizer.encode(str(d), add_special_tokens=False) == [token_id]
  assert tiny_tokenizer.encode("2 1", add_special_tokens=False) == [
      digit_ids[2], tiny_tokenizer.convert_tokens_to_ids("Ġ"), digit_ids[1]]
  assert tiny_tokenizer.encode("1234", add_special_tokens=False) == digit_ids[1:5]


def test_tiny_tokenizer_keeps_prompt_words_whole(tiny_tokenizer):
  text = " jigsaw puzzle patches position index original image answer"
  assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) == len(text.split())


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.text(max_size=60))
def test_tiny_tokenizer_round_trips_any_text(text):
  hypothesis.assume("<|" not in text and "tool_call>" not in text)
  tokenizer = _tiny_tokenizer()
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_tiny_tokenizer_chat_template_is_qwen2_vl_instruct(tiny_tokenizer):
  text = tiny_tokenizer.apply_chat_template(processing.user_turn("Hi 2 1."), tokenize=False,
                                            add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi 2 1.<|im_end|>\n"
                  "<|im_start|>assistant\n")
  with_system = [{"role": "system", "content": "Be brief."}] + processing.user_turn("Hi", False)
  assert tiny_tokenizer.apply_chat_template(with_system, tokenize=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_shipped_tiny_tokenizer_is_reproducible(tmp_path):
  build_tiny_tokenizer.write(tmp_path)
  shipped = tokenizer_lib.tiny_tokenizer_path()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert json.loads((tmp_path / name).read_text()) == json.loads((shipped / name).read_text()), (
        f"The shipped {name} differs from a rebuild; if the change is intended, regenerate it with "
        "`python -m jigsaw_jax.models.build_tiny_tokenizer` (and tiny presets' vocab_size).")


def test_load_tokenizer_errors_say_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="tokenizer.json.*found \\['config.json'\\]"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_special_token_ids_refuses_a_tokenizer_without_vision_tokens():
  bare = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bare)
  with pytest.raises(ValueError, match="no token '<\\|im_start\\|>'"):
    tokenizer_lib.special_token_ids(tokenizer)


# ---------------------------------------------------------------------------------------------
# The processor.
# ---------------------------------------------------------------------------------------------


class _ImageOnlyQwen25VLProcessor(transformers.Qwen2_5_VLProcessor):
  """transformers' processor minus its video processor (which needs torchvision)."""

  @classmethod
  def get_attributes(cls):
    return ["image_processor", "tokenizer"]


@pytest.mark.parametrize("size", [(100, 150), (427, 640), (30, 20)])
def test_processor_matches_transformers_qwen25_vl_processor(tiny_tokenizer, size):
  config = processing.ImageProcessingConfig()
  ours = processing.Processor(tiny_tokenizer, config)
  image = _image(*size, seed=2)
  inputs = ours.encode_prompt(PROMPT, image)

  reference_processor = _ImageOnlyQwen25VLProcessor(
      image_processor=_hf_image_processor(config), tokenizer=tiny_tokenizer,
      chat_template=tiny_tokenizer.chat_template)
  messages = processing.user_turn(PROMPT)
  text = reference_processor.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
  reference = reference_processor(text=[text], images=[image], return_tensors="np")

  np.testing.assert_array_equal(inputs.input_ids, reference["input_ids"][0])
  np.testing.assert_array_equal(inputs.image_grid_thw, reference["image_grid_thw"])
  np.testing.assert_allclose(inputs.pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)
  assert inputs.input_ids.dtype == np.int32
  n_pads = int((inputs.input_ids == ours.image_token_id).sum())
  assert n_pads == processing.num_image_tokens(*size, config)


def test_processor_without_image_and_with_mismatched_images(tiny_tokenizer):
  processor = processing.Processor(tiny_tokenizer)
  text_only = processor.encode_prompt("2 1", None)
  assert text_only.pixel_values.shape == (0, processor.image_config.patch_dim)
  assert text_only.image_grid_thw.shape == (0, 3)
  assert processor.image_token_id not in text_only.input_ids
  with pytest.raises(ValueError, match="1 image item\\(s\\) but 0 image"):
    processor(processing.user_turn("2 1"), images=[])


def test_processor_from_pretrained_uses_checkpoint_files(tmp_path):
  shipped = tokenizer_lib.tiny_tokenizer_path()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((shipped / name).read_bytes())
  (tmp_path / "preprocessor_config.json").write_text(
      json.dumps(dict(QWEN25_VL_PREPROCESSOR, max_pixels=28 * 28 * 16)))
  processor = processing.Processor.from_pretrained(tmp_path)
  assert processor.image_config.max_pixels == 28 * 28 * 16
  assert int((processor.encode_prompt("x", _image(427, 640)).input_ids
              == processor.image_token_id).sum()) <= 16


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
                  buckets=st.one_of(st.integers(1, 16), st.just((8, 32, 64))))
def test_left_pad_keeps_every_prompt_right_aligned(lengths, buckets):
  rng = np.random.default_rng(sum(lengths))
  prompts = [processing.PromptInputs(rng.integers(0, 900, n).astype(np.int32),
                                     np.zeros((4 * i, 1176), np.float32),
                                     np.array([[1, 2, 2]] * i, np.int32).reshape(i, 3))
             for i, n in enumerate(lengths)]
  batch = processing.collate(prompts, pad_id=1002, buckets=buckets)
  length = batch.input_ids.shape[1]
  assert length >= max(lengths) and length == processing.bucket_length(max(lengths), buckets)
  if isinstance(buckets, int):
    assert length % buckets == 0
  for row, prompt in enumerate(prompts):
    n = len(prompt.input_ids)
    np.testing.assert_array_equal(batch.input_ids[row, length - n:], prompt.input_ids)
    assert (batch.input_ids[row, :length - n] == 1002).all()
    np.testing.assert_array_equal(batch.attention_mask[row], [0] * (length - n) + [1] * n)
  assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32
  assert batch.pixel_values.shape[0] == sum(4 * i for i in range(len(lengths)))
  assert batch.image_grid_thw.shape == (sum(range(len(lengths))), 3)


def test_bucket_length_refuses_prompts_longer_than_the_largest_bucket():
  assert processing.bucket_length(33, (32, 64)) == 64
  with pytest.raises(ValueError, match="largest bucket 64"):
    processing.bucket_length(65, (32, 64))


def test_collate_real_prompts(tiny_tokenizer):
  processor = processing.Processor(tiny_tokenizer)
  prompts = [processor.encode_prompt(PROMPT, _image(56, 84)),
             processor.encode_prompt(PROMPT + " Think.", _image(84, 56))]
  longest = max(len(p.input_ids) for p in prompts)
  batch = processing.collate(prompts, processor.pad_token_id, buckets=16)
  assert batch.input_ids.shape == (2, -(-longest // 16) * 16)
  assert (batch.input_ids == processor.image_token_id).sum() == 2 * 6
  assert batch.pixel_values.shape == (2 * 24, 1176)
  np.testing.assert_array_equal(batch.image_grid_thw, [[1, 4, 6], [1, 6, 4]])
  assert (batch.input_ids[:, -1] == tiny_tokenizer.convert_tokens_to_ids("Ċ")).all()
