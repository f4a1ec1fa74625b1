"""The multimodal policy: vision tower + text decoder, the same function as transformers'
Qwen2_5_VLForConditionalGeneration / Qwen2VLForConditionalGeneration /
Qwen3VLForConditionalGeneration (dense), and (with `cfg.vision.kind == "internvl"`, see
models/internvl/) InternVLForConditionalGeneration.

    index = rope_index(cfg, input_ids, image_grid_thw, attn_mask)   # numpy, on the host
    out = model.apply(params, input_ids, index.positions, attn_mask,
                      pixel_values, image_grid_thw)                  # jit with grid_thw static

Image features replace the `<|image_pad|>` tokens in reading order (row by row, image by image),
as the reference's masked_scatter does. Position ids are M-RoPE triples (temporal, height, width):
text tokens count up by one on all three axes; the tokens of an image take (start, start + row,
start + col) and the next text resumes at start + max(rows, cols). The ids depend only on token ids
and image grids, so they are computed once on the host in numpy (`rope_index`) and enter jitted
code as an ordinary int32 input; so does the per-row `delta` that decoding needs: the token at
real-token count n (padding excluded) of a row sits at position n + delta. Qwen3-VL numbers its
image tokens the same way (only its rotation of the ids differs, `TextConfig.mrope_interleaved`),
and its tower also returns DeepStack features, which are added at the image tokens to the outputs
of the first decoder layers.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.internvl import vision as internvl_vision
from jigsaw_jax.models.qwen3_vl import vision as qwen3_vision

Array = jax.Array
Grid = Tuple[Tuple[int, int, int], ...]


class RopeIndex(NamedTuple):
  positions: np.ndarray  # int32 [3, B, L]; 0 at padding
  deltas: np.ndarray  # int32 [B]: position of a row's n-th real token minus n, after the prompt


def _grid_tuple(image_grid_thw) -> Grid:
  if image_grid_thw is None:
    return ()
  return tuple(tuple(int(v) for v in row) for row in np.asarray(image_grid_thw).reshape(-1, 3))


def rope_index(
    cfg: ModelConfig,
    input_ids: np.ndarray,  # int [B, L]
    image_grid_thw=None,  # (t, h, w) per image, in patches, in order of appearance
    attn_mask: Optional[np.ndarray] = None,  # [B, L], 1 real / 0 padding
) -> RopeIndex:
  """M-RoPE position ids and decode deltas, exactly as transformers' `get_rope_index`.

  Runs of consecutive image-pad tokens are images; each takes the next grid (grids are consumed
  across the batch in reading order). Padding positions get id 0 and do not count.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}.")
  b, l = input_ids.shape
  valid = np.ones((b, l), bool) if attn_mask is None else np.asarray(attn_mask).astype(bool)
  if cfg.text.mrope_section is None:
    return sequential_index(valid)
  merge = cfg.vision.spatial_merge_size if cfg.vision is not None else 1
  grids = iter(_grid_tuple(image_grid_thw))
  positions = np.zeros((3, b, l), np.int64)
  deltas = np.zeros((b,), np.int64)
  for row in range(b):
    ids = input_ids[row][valid[row]]
    if np.any(ids == cfg.video_token_id) and cfg.vision is not None:
      raise NotImplementedError("video inputs are not supported; found video-pad tokens in row "
                                f"{row}.")
    is_image = (ids == cfg.image_token_id) if cfg.vision is not None else np.zeros_like(ids, bool)
    pieces, start = [], 0
    for image, run in itertools.groupby(is_image.tolist()):
      n = len(list(run))
      if not image:
        pieces.append(np.broadcast_to(np.arange(n) + start, (3, n)))
        start += n
        continue
      grid = next(grids, None)
      if grid is None:
        raise ValueError(f"row {row} has more images (runs of image-pad tokens) than "
                         "image_grid_thw has rows; pass one (t, h, w) per image.")
      t, h, w = grid[0], grid[1] // merge, grid[2] // merge
      if n != t * h * w:
        raise ValueError(
            f"row {row}: an image occupies {n} image-pad tokens but its grid {grid} needs "
            f"t*h*w/{merge * merge} = {t * h * w}. Build the prompt with one pad token per merged "
            "patch (the processor's image_grid_thw.prod() // merge**2).")
      tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
      pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + start)
      start += max(grid[1], grid[2]) // merge
    pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    positions[:, row, valid[row]] = pos
    deltas[row] = (pos.max() + 1 if pos.size else 0) - len(ids)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw has more rows than there are images (runs of image-pad "
                     "tokens) in input_ids.")
  return RopeIndex(positions.astype(np.int32), deltas.astype(np.int32))


def sequential_index(valid: np.ndarray) -> RopeIndex:
  """1-D RoPE (InternVL's Qwen2, text-only decoders): every real token, image tokens included,
  one position after the previous real one; the same id on all three axes, and delta 0."""
  pos = np.where(valid, np.cumsum(valid, axis=1) - 1, 0)
  return RopeIndex(np.broadcast_to(pos[None], (3,) + pos.shape).astype(np.int32),
                   np.zeros((valid.shape[0],), np.int32))


def decode_positions(cache: decoder_lib.Cache, deltas: Array) -> Array:
  """M-RoPE ids [3, B, 1] of the next token of each row: real tokens in the cache + delta."""
  pos = decoder_lib.cache_lengths(cache) + deltas.astype(jnp.int32)
  return jnp.broadcast_to(pos[None, :, None], (3, pos.shape[0], 1))


def scatter_image_features(embeds: Array, is_image: Array, features: Array) -> Array:
  """Puts features[k] at the k-th image-pad token (reading order); static shapes, so it jits.

  embeds [B, L, E], is_image bool [B, L], features [M, E] with M the number of image-pad tokens.
  """
  b, l, e = embeds.shape
  flat = is_image.reshape(-1)
  k = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
  gathered = jnp.take(features.astype(embeds.dtype), k, axis=0).reshape(b, l, e)
  return jnp.where(is_image[..., None], gathered, embeds)


class VisionLanguageModel(nn.Module):
  """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `visual` (the vision tower) and `decoder` (the text
  decoder)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.decoder = decoder_lib.TextDecoder(cfg.text, cfg.dtype, cfg.param_dtype, cfg.remat,
                                           cfg.attention_impl, cfg.adapter)
    if cfg.vision is not None and cfg.vision.kind == internvl_vision.KIND:
      self.visual = internvl_vision.InternVisionTower(cfg.vision, cfg.dtype, cfg.param_dtype,
                                                      cfg.remat)
    elif cfg.vision is not None and cfg.vision.kind == "qwen3_vl":
      self.visual = qwen3_vision.Qwen3VisionTower(cfg.vision, cfg.dtype, cfg.param_dtype,
                                                  cfg.remat, cfg.attention_impl)
    elif cfg.vision is not None:
      from jigsaw_jax.models import vision  # Imported here: text-only models never need it.
      self.visual = vision.VisionTower(cfg.vision, cfg.dtype, cfg.param_dtype, cfg.remat,
                                       cfg.attention_impl)

  def __call__(
      self,
      input_ids: Array,  # int [B, T]
      positions: Array,  # int [3, B, T] (rope_index / decode_positions), or [B, T] for 1-D RoPE
      attn_mask: Array,  # [B, T]: 1 real token, 0 padding
      pixel_values: Optional[Array] = None,  # [N, C*T*P*P]: all images' patches, concatenated
      image_grid_thw: Optional[Sequence[Sequence[int]]] = None,  # static (t, h, w) per image
      cache: Optional[decoder_lib.Cache] = None,
      *,
      return_hidden: bool = False,
      return_logits: bool = True,
      last_logits_only: bool = False,
      tap_layer: Optional[int] = None,  # also return the residual stream entering this layer
      adapters_enabled: bool = True,  # False: the base model alone (cfg.adapter's variables unused)
  ) -> decoder_lib.DecoderOutput:
    embeds = self.decoder.embed(input_ids)
    deepstack = None
    if pixel_values is not None:
      if self.cfg.vision is None:
        raise ValueError("pixel_values given to a model without a vision tower (cfg.vision=None).")
      features = self.visual(pixel_values, _grid_tuple(image_grid_thw))
      is_image = input_ids == self.cfg.image_token_id
      if isinstance(features, qwen3_vision.VisionFeatures):
        # DeepStack: zero away from the image tokens, so adding it leaves text untouched.
        deepstack = [scatter_image_features(jnp.zeros_like(embeds), is_image, f)
                     for f in features.deepstack] or None
        features = features.merged
      embeds = scatter_image_features(embeds, is_image, features)
    return self.decoder(embeds, positions, attn_mask, cache, return_hidden=return_hidden,
                        return_logits=return_logits, last_logits_only=last_logits_only,
                        tap_layer=tap_layer, adapters_enabled=adapters_enabled,
                        deepstack=deepstack)


def dummy_inputs(cfg: ModelConfig) -> dict:
  """The smallest valid inputs (one 1-token image when there is a vision tower): for init."""
  ids = np.zeros((1, 1), np.int32)
  inputs = dict(input_ids=ids, positions=np.zeros((3, 1, 1), np.int32),
                attn_mask=np.ones((1, 1), np.int32))
  if cfg.vision is not None and cfg.vision.kind == internvl_vision.KIND:
    pixels, tokens = internvl_vision.dummy_pixels(cfg.vision)
    inputs.update(input_ids=np.full((1, tokens), cfg.image_token_id, np.int32),
                  positions=np.zeros((3, 1, tokens), np.int32),
                  attn_mask=np.ones((1, tokens), np.int32), pixel_values=pixels,
                  image_grid_thw=((1, 1, 1),))
  elif cfg.vision is not None:
    v, m = cfg.vision, cfg.vision.spatial_merge_size
    ids[:] = cfg.image_token_id
    inputs.update(
        pixel_values=np.zeros((m * m, v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                              np.float32),
        image_grid_thw=((1, m, m),))
  return inputs


def square_image_inputs(cfg: ModelConfig, image_tokens: int) -> Tuple[int, int, Tuple[int, ...]]:
  """(pixel_values rows, row length, image_grid_thw row) of one square image that fills
  `image_tokens` placeholder tokens: for shapes without data (the memory plan)."""
  v = cfg.vision
  if v.kind == internvl_vision.KIND:
    tiles, rest = divmod(image_tokens, v.tokens_per_tile)
    if rest or not tiles:
      raise ValueError(f"{image_tokens} image tokens are not a whole number of {v.image_size}-pixel "
                       f"tiles of {v.tokens_per_tile} tokens each.")
    return tiles, v.tile_dim, (tiles, 1, 1)
  side = v.spatial_merge_size * math.isqrt(image_tokens)  # patches per side
  if side * side != v.spatial_merge_size ** 2 * image_tokens:
    raise ValueError(f"{image_tokens} image tokens do not make one square image (a square number "
                     "is needed).")
  return side * side, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, (1, side, side)


# The layers draw every weight matrix (and the embedding) from normal(0, LAYER_INIT_STD), the
# reference's default initializer_range; biases start at 0 and norm scales at 1.
LAYER_INIT_STD = 0.02


def apply_initializer_range(cfg: ModelConfig, variables: dict) -> dict:
  """Rescales freshly initialised weights to each tower's `initializer_range`.

  A normal(0, 0.02) draw times k is a normal(0, 0.02 k) draw, so this equals initialising with
  the configured std. Only matrices and embeddings scale (biases are 0, norm scales stay 1);
  only the 'params' collection is touched (adapters keep their own initialisation). A no-op for
  the published presets (0.02); the CPU jigsaw preset needs larger draws (see presets.py).
  """
  factors = {"decoder": cfg.text.initializer_range / LAYER_INIT_STD,
             "visual": (cfg.vision.initializer_range / LAYER_INIT_STD) if cfg.vision else 1.0}
  if all(f == 1.0 for f in factors.values()):
    return variables

  def scale(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[0] != "params" or x.ndim < 2:  # biases and norm scales are 1-D
      return x
    return x * jnp.asarray(factors.get(names[1], 1.0), x.dtype)

  return jax.tree_util.tree_map_with_path(scale, variables)


def init_params(cfg: ModelConfig, rng: Array) -> dict:
  """Random parameters {'params': ...} (unboxed arrays) in cfg.param_dtype."""
  model = VisionLanguageModel(cfg)
  inputs = dummy_inputs(cfg)
  grid = inputs.pop("image_grid_thw", None)
  init = jax.jit(lambda r: apply_initializer_range(
      cfg, nn.unbox(model.init(r, **inputs, image_grid_thw=grid))))
  return init(rng)


def init_adapters(cfg: ModelConfig, rng: Array) -> dict:
  """Fresh adapter variables {'adapter': ...} of an adapted ModelConfig (zero-effect at init).

  Runs the model's init under jit returning only the adapter collection, so the base weights it
  would create are never materialised (XLA drops them).
  """
  if cfg.adapter is None:
    raise ValueError("init_adapters needs a ModelConfig with an adapter (cfg.adapter is None).")
  model = VisionLanguageModel(cfg)
  inputs = dummy_inputs(cfg)
  grid = inputs.pop("image_grid_thw", None)
  init = lambda r: {adapters_lib.COLLECTION: nn.unbox(model.init(
      r, **inputs, image_grid_thw=grid))[adapters_lib.COLLECTION]}
  return jax.jit(init)(rng)


def abstract_params(cfg: ModelConfig) -> dict:
  """Parameter shapes/dtypes as jax.ShapeDtypeStruct, still boxed with their logical axis names.

  Nothing is allocated (jax.eval_shape), so this is cheap for the 7B presets.
  """
  model = VisionLanguageModel(cfg)
  inputs = dummy_inputs(cfg)
  grid = inputs.pop("image_grid_thw", None)
  return jax.eval_shape(lambda r: model.init(r, **inputs, image_grid_thw=grid),
                        jax.random.key(0))


def logical_axes(cfg: ModelConfig) -> Any:
  """The logical axis names of every parameter: a tree of PartitionSpec (of logical names)."""
  return nn.get_partition_spec(abstract_params(cfg))
