"""InternVL's inputs: dynamic 448-pixel tiling with a thumbnail, and <img>...</img> prompts.

What transformers' InternVLProcessor produces with its GotOcr2 image processor (the PIL backend,
`crop_to_patches=True`), in numpy and PIL:

1. Among the tile grids (columns, rows) with min_patches <= columns * rows <= max_patches, pick
   the one whose aspect ratio is closest to the image's; on a tie prefer the later (larger) grid
   while the image has more than half the grid's area in pixels.
2. PIL bicubic resizes the uint8 image to (columns * 448, rows * 448) and cuts it into tiles in
   reading order; with more than one tile a thumbnail (the whole image at 448 x 448) follows.
3. Each tile is rescaled by 1/255 and normalised with the checkpoint's mean/std (ImageNet's for
   InternVL), channels first: pixel_values [tiles, C * 448 * 448].
4. Each image becomes <img> + <IMG_CONTEXT> x (256 * tiles) + </img> in the prompt.

For the rest of the pipeline an image is the run of its <IMG_CONTEXT> tokens, and its
`image_grid_thw` row is (tiles, 1, 1): the number of pixel_values rows it owns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import transformers

from jigsaw_jax.models import processing
from jigsaw_jax.models import tokenizer as tokenizer_lib
from jigsaw_jax.models.internvl.config import KIND  # pylint: disable=unused-import (dispatch key)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# InternVL's tokens and, for the tiny tokenizer (which has none of them), the Qwen-VL tokens that
# play their parts: <|vision_start|> <|image_pad|> <|vision_end|>.
INTERNVL_TOKENS = ("<img>", "<IMG_CONTEXT>", "</img>")
QWEN_STAND_INS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  """The image settings of an InternVL checkpoint (preprocessor_config.json + image_seq_length)."""

  image_size: int = 448
  min_patches: int = 1
  max_patches: int = 12
  crop_to_patches: bool = True
  tokens_per_tile: int = 256
  image_mean: Tuple[float, ...] = IMAGENET_MEAN
  image_std: Tuple[float, ...] = IMAGENET_STD
  rescale_factor: float = 1 / 255

  @property
  def tile_dim(self) -> int:
    return len(self.image_mean) * self.image_size ** 2

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any], tokens_per_tile: int = 256) -> "TilingConfig":
    processing._check_supported(config)  # pylint: disable=protected-access
    size = dict(config.get("size") or {})
    height, width = size.get("height", 448), size.get("width", 448)
    if height != width:
      raise ValueError(f"tile size {height}x{width} is not supported; InternVL's tiles are square.")
    d = cls()
    return cls(image_size=int(height), min_patches=int(config.get("min_patches", d.min_patches)),
               max_patches=int(config.get("max_patches", d.max_patches)),
               # InternVLProcessor passes crop_to_patches=True to its image processor whatever
               # preprocessor_config.json says (the image processor's own default is False).
               crop_to_patches=True,
               tokens_per_tile=int(tokens_per_tile),
               image_mean=tuple(float(x) for x in config.get("image_mean", d.image_mean)),
               image_std=tuple(float(x) for x in config.get("image_std", d.image_std)),
               rescale_factor=float(config.get("rescale_factor", d.rescale_factor)))


@functools.lru_cache(maxsize=64)
def tile_grid(height: int, width: int, tile: int, min_patches: int, max_patches: int
              ) -> Tuple[int, int]:
  """(columns, rows) of the tiling of a height x width image (the processor's rule, step 1)."""
  grids = sorted(((c, r) for c in range(1, max_patches + 1) for r in range(1, max_patches + 1)
                  if min_patches <= c * r <= max_patches), key=lambda g: g[0] * g[1])
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float("inf")
  for columns, rows in grids:
    diff = abs(aspect - columns / rows)
    if diff < best_diff:
      best, best_diff = (columns, rows), diff
    elif diff == best_diff and area > 0.5 * tile * tile * columns * rows:
      best = (columns, rows)
  return best


def num_tiles(height: int, width: int, config: TilingConfig = TilingConfig()) -> int:
  """Tiles an image of this size becomes, thumbnail included, without processing it."""
  if not config.crop_to_patches or config.max_patches <= 1:
    return 1
  columns, rows = tile_grid(height, width, config.image_size, config.min_patches,
                            config.max_patches)
  return columns * rows + (1 if columns * rows > 1 else 0)


def preprocess_image(image: np.ndarray, config: TilingConfig = TilingConfig()) -> np.ndarray:
  """uint8 image (H, W, 3) -> pixel_values float32 [tiles, C * S * S] (thumbnail last)."""
  image = processing.to_rgb(image)
  s = config.image_size
  if config.crop_to_patches and config.max_patches > 1:
    columns, rows = tile_grid(image.shape[0], image.shape[1], s, config.min_patches,
                              config.max_patches)
    canvas = processing.resize(image, rows * s, columns * s)
    tiles = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s]
             for r in range(rows) for c in range(columns)]
    if len(tiles) > 1:
      tiles.append(processing.resize(image, s, s))
  else:
    tiles = [processing.resize(image, s, s)]
  normalised = [processing.normalize(t, config).transpose(2, 0, 1).reshape(-1) for t in tiles]
  return np.stack(normalised).astype(np.float32)


def _image_token_ids(tokenizer) -> Tuple[int, int, int]:
  """(<img>, <IMG_CONTEXT>, </img>) ids: InternVL's tokens, or the tiny tokenizer's stand-ins."""
  for names in (INTERNVL_TOKENS, QWEN_STAND_INS):
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    if all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids):
      return tuple(ids)
  raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has neither {INTERNVL_TOKENS} "
                   f"(an InternVL tokenizer) nor {QWEN_STAND_INS}; use an InternVL checkpoint's "
                   "tokenizer or the tiny one.")


class InternVLProcessor(processing.Processor):
  """Chat + images -> token ids with <img><IMG_CONTEXT>...</img>, and tiles."""

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase,
               tiling: TilingConfig = TilingConfig()):
    super().__init__(tokenizer, processing.ImageProcessingConfig())
    self.tiling = tiling
    self.image_start_id, self.context_id, self.image_end_id = _image_token_ids(tokenizer)

  @classmethod
  def from_pretrained(cls, directory=None) -> "InternVLProcessor":
    if directory is None:
      return cls(tokenizer_lib.load_tokenizer(None))
    directory = pathlib.Path(directory)
    read = lambda name: (json.loads((directory / name).read_text(encoding="utf-8"))
                         if (directory / name).is_file() else {})
    image = read("preprocessor_config.json") or read("processor_config.json").get(
        "image_processor", {})
    if not image:
      raise FileNotFoundError(f"No image processor settings in {str(directory)!r}: expected "
                              "preprocessor_config.json, as InternVL -hf checkpoints ship.")
    seq = read("processor_config.json").get("image_seq_length", 256)
    return cls(tokenizer_lib.load_tokenizer(directory), TilingConfig.from_hf_dict(image, seq))

  @property
  def image_token_id(self) -> int:
    return self.context_id

  def __call__(self, messages, images: Sequence[np.ndarray] = (),
               add_generation_prompt: bool = True) -> processing.PromptInputs:
    text = self.render_chat(messages, add_generation_prompt)
    ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    tiles = [preprocess_image(image, self.tiling) for image in images]
    grids = np.asarray([(len(t), 1, 1) for t in tiles], np.int32).reshape(-1, 3)
    pixel_values = (np.concatenate(tiles) if tiles else
                    np.zeros((0, self.tiling.tile_dim), np.float32))
    return processing.PromptInputs(self._expand(ids, grids[:, 0]), pixel_values, grids)

  def _expand(self, ids: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Each image's context token -> tokens_per_tile * tiles of them, inside <img> ... </img>
    (added when the chat template did not already put them around it)."""
    where = np.flatnonzero(ids == self.context_id)
    if len(where) != len(tiles):
      raise ValueError(f"The chat has {len(where)} image item(s) but {len(tiles)} image(s) were "
                       "given; pass exactly one image per {'type': 'image'} content item.")
    pieces: List[np.ndarray] = []
    start = 0
    for at, n in zip(where, tiles):
      wrapped = (at > 0 and ids[at - 1] == self.image_start_id and at + 1 < len(ids)
                 and ids[at + 1] == self.image_end_id)
      run = [self.context_id] * int(n * self.tiling.tokens_per_tile)
      pieces += [ids[start:at], np.asarray(run if wrapped else
                                           [self.image_start_id, *run, self.image_end_id])]
      start = at + 1
    pieces.append(ids[start:])
    return np.concatenate(pieces).astype(np.int32)


def processor_for(cfg, checkpoint: Optional[str] = None) -> InternVLProcessor:
  """The checkpoint's processor, or the tiny tokenizer with tiles the preset's tower takes."""
  if checkpoint:
    proc = InternVLProcessor.from_pretrained(checkpoint)
  else:
    v = cfg.vision
    proc = InternVLProcessor(tokenizer_lib.load_tokenizer(None), TilingConfig(
        image_size=v.image_size, tokens_per_tile=v.tokens_per_tile))
  ids = (proc.image_start_id, proc.context_id, proc.image_end_id)
  expected = (cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id)
  if ids != expected:
    raise ValueError(f"the tokenizer's <img>, <IMG_CONTEXT>, </img> ids {ids} differ from the "
                     f"model config's {expected}; the tokenizer and weights must come from the "
                     "same checkpoint.")
  return proc
