"""Text + image inputs of the Qwen-VL policy: numpy image patches, chat prompts, batch collation.

This reproduces what `transformers.Qwen2_5_VLProcessor` (with `Qwen2VLImageProcessor`, shared by
Qwen2-VL and Qwen2.5-VL) produces, without torch or torchvision, so that a checkpoint sees exactly
the inputs it was trained on:

1. `smart_resize` picks a size divisible by patch_size * merge_size (28) with an area in
   [min_pixels, max_pixels], keeping the aspect ratio; PIL bicubic resizes the uint8 image to it.
2. Rescale by 1/255 (in float64, stored as float32, like HF), then normalise with CLIP's mean/std.
3. The frame is repeated temporal_patch_size (2) times and cut into 14x14 patches, ordered so that
   the 2x2 patches that the vision tower's merger joins into one token are consecutive:
   pixel_values [grid_t*grid_h*grid_w, C*T*P*P] and image_grid_thw (t, h, w).
4. The chat template places one <|image_pad|> per image; it is repeated
   grid_t*grid_h*grid_w / merge_size**2 times, one per merged visual token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import transformers

from jigsaw_jax.models import tokenizer as tokenizer_lib

PathLike = Union[str, os.PathLike]
Messages = List[Dict[str, Any]]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, the `resample` of Qwen-VL's preprocessor_config.
_MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageProcessingConfig:
  """Qwen-VL image preprocessing settings (a checkpoint's preprocessor_config.json).

  Defaults are Qwen2.5-VL-*-Instruct's, which Jigsaw-R1 also uses: images between 56x56 and
  16384 tokens' worth of pixels, so COCO photos go in at about native resolution.
  """

  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 16384
  image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: Tuple[float, ...] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one row of pixel_values (C * T * P * P)."""
    return len(self.image_mean) * self.temporal_patch_size * self.patch_size**2

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> "ImageProcessingConfig":
    """Reads an HF image-processor dict; min/max_pixels override `size` as in transformers."""
    _check_supported(config)
    size = dict(config.get("size") or {})
    min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    defaults = cls()
    return cls(
        patch_size=int(config.get("patch_size", defaults.patch_size)),
        merge_size=int(config.get("merge_size", defaults.merge_size)),
        temporal_patch_size=int(config.get("temporal_patch_size", defaults.temporal_patch_size)),
        min_pixels=int(defaults.min_pixels if min_pixels is None else min_pixels),
        max_pixels=int(defaults.max_pixels if max_pixels is None else max_pixels),
        image_mean=tuple(float(x) for x in config.get("image_mean", defaults.image_mean)),
        image_std=tuple(float(x) for x in config.get("image_std", defaults.image_std)),
        rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
    )

  @classmethod
  def from_pretrained(cls, directory: PathLike) -> "ImageProcessingConfig":
    """Reads a directory's preprocessor_config.json (or processor_config.json's image_processor)."""
    directory = pathlib.Path(directory)
    preprocessor = directory / "preprocessor_config.json"
    if preprocessor.is_file():
      return cls.from_hf_dict(json.loads(preprocessor.read_text(encoding="utf-8")))
    processor = directory / "processor_config.json"
    if processor.is_file():
      config = json.loads(processor.read_text(encoding="utf-8"))
      if isinstance(config.get("image_processor"), dict):
        return cls.from_hf_dict(config["image_processor"])
    raise FileNotFoundError(
        f"No image processor settings in {str(directory)!r}: expected preprocessor_config.json "
        "(or processor_config.json with an 'image_processor' entry), as Qwen2-VL / Qwen2.5-VL "
        "checkpoints ship. Point the config at the checkpoint directory, or use "
        "ImageProcessingConfig() for Qwen2.5-VL's defaults.")


def _check_supported(config: Mapping[str, Any]) -> None:
  """Refuses settings we do not reproduce rather than silently preprocessing differently."""
  for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
    if config.get(flag, True) is not True:
      raise ValueError(f"Image processor setting {flag}={config[flag]!r} is not supported; "
                       "only Qwen-VL's standard pipeline (all steps on) is reproduced.")
  resample = config.get("resample", _PIL_BICUBIC)
  if resample != _PIL_BICUBIC:
    raise ValueError(f"Image processor setting resample={resample!r} is not supported; "
                     f"expected {_PIL_BICUBIC} (PIL bicubic), as Qwen-VL checkpoints use.")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 16384) -> Tuple[int, int]:
  """The size Qwen-VL resizes an image to: sides divisible by `factor`, area within bounds.

  Same arithmetic as transformers' `smart_resize` (round, then floor/ceil after rescaling the
  area), so token counts agree exactly with the reference.
  """
  if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
    raise ValueError(f"Absolute aspect ratio must be at most {_MAX_ASPECT_RATIO}, got "
                     f"{max(height, width) / min(height, width)} for a {height}x{width} image; "
                     "crop or pad it first.")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) → (H, W, 3); alpha is composited on white."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"Expected a uint8 image, got dtype {image.dtype}; convert with "
                    "np.asarray(PIL.Image.open(path).convert('RGB')).")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Expected an image of shape (H, W, 3) (or (H, W), (H, W, 1), (H, W, 4)), "
                     f"got {image.shape}.")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:  # Like transformers' convert_to_rgb: paste on a white background.
    white = PIL.Image.new("RGBA", (image.shape[1], image.shape[0]), (255, 255, 255))
    return np.asarray(PIL.Image.alpha_composite(white, PIL.Image.fromarray(image))
                      .convert("RGB"))
  return image


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bicubic on the uint8 image (before rescaling), as transformers' PIL backend does."""
  resized = PIL.Image.fromarray(image).resize((width, height),
                                              resample=PIL.Image.Resampling.BICUBIC)
  return np.asarray(resized)


def normalize(image: np.ndarray, config: ImageProcessingConfig) -> np.ndarray:
  """uint8 → float32 (x * rescale - mean) / std, with HF's float64 rescale then float32 maths."""
  scaled = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.image_mean, np.float32)
  std = np.asarray(config.image_std, np.float32)
  return (scaled - mean) / std


def patchify(image: np.ndarray, config: ImageProcessingConfig) -> Tuple[np.ndarray, np.ndarray]:
  """(H, W, C) float32 → pixel_values [gh*gw, C*T*P*P] and image_grid_thw (1, gh, gw).

  Rows are ordered merge-window-major, (gh/m, gw/m, m, m), and each row is (C, T, P, P): the
  layout the vision tower's patch embedding and 2x2 merger expect.
  """
  height, width, channels = image.shape
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  if height % (p * m) or width % (p * m):
    raise ValueError(f"Image sides must be multiples of {p * m}, got {height}x{width}; "
                     "resize with smart_resize first.")
  grid_h, grid_w = height // p, width // p
  patches = image.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
  patches = patches.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, P, P)
  patches = np.broadcast_to(patches[:, :, :, :, :, None],  # A still image: T identical frames.
                            patches.shape[:5] + (t,) + patches.shape[5:])
  pixel_values = np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p))
  return pixel_values, np.array([1, grid_h, grid_w], np.int32)


def preprocess_image(image: np.ndarray,
                     config: ImageProcessingConfig = ImageProcessingConfig()
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 image (H, W, 3) → (pixel_values float32 [N, C*T*P*P], image_grid_thw int32 (3,))."""
  image = to_rgb(image)
  height, width = smart_resize(image.shape[0], image.shape[1], config.factor, config.min_pixels,
                               config.max_pixels)
  return patchify(normalize(resize(image, height, width), config), config)


def num_image_tokens(height: int, width: int,
                     config: ImageProcessingConfig = ImageProcessingConfig()) -> int:
  """How many <|image_pad|> tokens an image of this size becomes, without processing it."""
  h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
  return (h // config.factor) * (w // config.factor)


class PromptInputs(NamedTuple):
  """One prompt, ready for the policy (a pytree, like every NamedTuple)."""

  input_ids: np.ndarray  # int32 [L], image pads expanded.
  pixel_values: np.ndarray  # float32 [sum of grid_t*grid_h*grid_w, C*T*P*P].
  image_grid_thw: np.ndarray  # int32 [num_images, 3].


class PromptBatch(NamedTuple):
  """Left-padded prompts: the last real token of every row sits in the last column."""

  input_ids: np.ndarray  # int32 [B, L].
  attention_mask: np.ndarray  # int32 [B, L]: 1 on real tokens, 0 on left padding.
  pixel_values: np.ndarray  # float32 [all patches of all images, in row order, C*T*P*P].
  image_grid_thw: np.ndarray  # int32 [num_images, 3].


def user_turn(text: str, with_image: bool = True) -> Messages:
  """The chat Jigsaw-R1 builds: one user turn with content [image, text]."""
  content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
  return [{"role": "user", "content": content}]


class Processor:
  """Chat + images → token ids with expanded image pads, and patches (Qwen2.5-VL's processor)."""

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase,
               image_config: ImageProcessingConfig = ImageProcessingConfig()):
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has no chat template; Qwen-VL "
                       "instruct checkpoints carry one in tokenizer_config.json.")
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.special_ids = tokenizer_lib.special_token_ids(tokenizer)

  @classmethod
  def from_pretrained(cls, directory: Optional[PathLike] = None) -> "Processor":
    """A checkpoint directory's tokenizer and image settings; None: tiny tokenizer, defaults."""
    if directory is None:
      return cls(tokenizer_lib.load_tokenizer(None), ImageProcessingConfig())
    return cls(tokenizer_lib.load_tokenizer(directory),
               ImageProcessingConfig.from_pretrained(directory))

  @property
  def image_token_id(self) -> int:
    return self.special_ids.image_pad

  @property
  def pad_token_id(self) -> int:
    return self.special_ids.pad

  def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The chat template's text, with one <|image_pad|> per image."""
    return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def __call__(self, messages: Messages, images: Sequence[np.ndarray] = (),
               add_generation_prompt: bool = True) -> PromptInputs:
    """Tokenises a chat and its images (in the order the image items appear)."""
    text = self.render_chat(messages, add_generation_prompt)
    ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    processed = [preprocess_image(image, self.image_config) for image in images]
    grids = np.stack([g for _, g in processed]) if processed else np.zeros((0, 3), np.int32)
    pixel_values = (np.concatenate([p for p, _ in processed]) if processed else
                    np.zeros((0, self.image_config.patch_dim), np.float32))
    return PromptInputs(self._expand_image_pads(ids, grids), pixel_values, grids)

  def encode_prompt(self, text: str, image: Optional[np.ndarray]) -> PromptInputs:
    """Jigsaw-R1's prompt: one user turn [image, text], with the generation prompt appended."""
    return self(user_turn(text, with_image=image is not None),
                [] if image is None else [image])

  def _expand_image_pads(self, ids: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """Repeats the i-th <|image_pad|> once per merged token of image i (HF's replacement rule)."""
    is_pad = ids == self.image_token_id
    if int(is_pad.sum()) != len(grids):
      raise ValueError(f"The chat has {int(is_pad.sum())} image item(s) but {len(grids)} image(s) "
                       "were given; pass exactly one image per {'type': 'image'} content item.")
    repeats = np.ones(len(ids), np.int64)
    repeats[is_pad] = np.prod(grids, axis=-1) // self.image_config.merge_size**2
    return np.repeat(ids, repeats)


def bucket_length(length: int, buckets: Union[int, Sequence[int]]) -> int:
  """Rounds a length up to a bucket, so jitted functions see few distinct shapes.

  An int means "a multiple of"; a sequence lists the allowed lengths.
  """
  if isinstance(buckets, int):
    if buckets < 1:
      raise ValueError(f"A bucket multiple must be >= 1, got {buckets}.")
    return -(-length // buckets) * buckets
  fitting = [b for b in sorted(buckets) if b >= length]
  if not fitting:
    raise ValueError(f"A prompt of {length} tokens is longer than the largest bucket "
                     f"{max(buckets)}; add a larger bucket (or lower the image max_pixels).")
  return fitting[0]


def left_pad(sequences: Sequence[np.ndarray], pad_id: int, length: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
  """Stacks 1-D id arrays right-aligned in [B, length]; returns (ids, attention_mask) as int32.

  Left padding lets every row of a batch start decoding at the same column.
  """
  longest = max((len(s) for s in sequences), default=0)
  length = longest if length is None else length
  if longest > length:
    raise ValueError(f"A sequence of {longest} tokens does not fit in length {length}.")
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, sequence in enumerate(sequences):
    if len(sequence):
      ids[row, length - len(sequence):] = sequence
      mask[row, length - len(sequence):] = 1
  return ids, mask


def collate(prompts: Sequence[PromptInputs], pad_id: int,
            buckets: Union[int, Sequence[int]] = 1) -> PromptBatch:
  """Left-pads prompts to a common bucketed length and concatenates their images in row order."""
  if not prompts:
    raise ValueError("Cannot collate an empty list of prompts.")
  length = bucket_length(max(len(p.input_ids) for p in prompts), buckets)
  ids, mask = left_pad([p.input_ids for p in prompts], pad_id, length)
  return PromptBatch(
      input_ids=ids,
      attention_mask=mask,
      pixel_values=np.concatenate([p.pixel_values for p in prompts]).astype(np.float32),
      image_grid_thw=np.concatenate([p.image_grid_thw for p in prompts]).astype(np.int32),
  )
