r"""Checks that our model computes the same function as transformers on a checkpoint directory.

    python -m jigsaw_jax.models.parity --hf /path/to/Qwen2.5-VL-3B-Instruct [--tol 1e-4]

Loads the directory into our model and into transformers (PyTorch, CPU, float32), runs the same
batch through both (an image + prompt row, and a left-padded text-only row), prints the largest
|logit difference| over real tokens and exits with status 1 above the tolerance.

The prompt is built with the directory's tokenizer, chat template and preprocessor_config.json
when it has them; otherwise (a bare save_pretrained directory) from a random image through our
numpy preprocessing and token ids made from the config's special ids. Ours runs first and frees
its weights before transformers loads, so peak memory is one model, not two.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
from typing import NamedTuple, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ParityInputs(NamedTuple):
  input_ids: np.ndarray  # int [B, L], left-padded
  attn_mask: np.ndarray  # int [B, L]
  pixel_values: np.ndarray  # float32 [N, C*T*P*P]
  image_grid_thw: tuple  # ((t, h, w),) per image
  source: str  # how the prompt was built


def _random_image(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
  """Smooth colour gradients plus noise: a non-trivial uint8 RGB image."""
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  base = np.stack([yy, xx, 1 - yy * xx], -1) * 200 + rng.uniform(0, 55, (height, width, 3))
  return base.astype(np.uint8)


def build_inputs(directory: pathlib.Path, cfg, *, seed: int = 0, height: int = 84,
                 width: int = 112, prompt: str = "Describe the picture.") -> ParityInputs:
  """A two-row batch: [image + prompt] and a shorter text-only prompt, left-padded."""
  from jigsaw_jax.models import processing
  from jigsaw_jax.models import tokenizer as tokenizer_lib
  rng = np.random.RandomState(seed)
  image = _random_image(rng, height, width)
  tokenizer_files = any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json"))
  if cfg.vision.kind == "internvl":
    return _internvl_inputs(directory, cfg, rng, image, prompt, tokenizer_files)
  if tokenizer_files:
    try:
      tokenizer = tokenizer_lib.load_tokenizer(directory)
      image_config = (processing.ImageProcessingConfig.from_pretrained(directory)
                      if (directory / "preprocessor_config.json").is_file()
                      else _image_config(cfg, processing))
      proc = processing.Processor(tokenizer, image_config)
      with_image = proc.encode_prompt(prompt, image)
      text_only = proc.encode_prompt("Hi.", None)
      ids, mask = processing.left_pad([with_image.input_ids, text_only.input_ids],
                                      proc.pad_token_id)
      grid = tuple(tuple(int(v) for v in g) for g in with_image.image_grid_thw)
      return ParityInputs(ids, mask, with_image.pixel_values, grid,
                          "the directory's tokenizer and chat template")
    except (ValueError, OSError) as e:  # No chat template or special tokens: build it ourselves.
      print(f"note: not using the directory's tokenizer ({e}); building token ids directly.")
  pixel_values, grid = processing.preprocess_image(image, _image_config(cfg, processing))
  n_image = int(np.prod(grid)) // cfg.vision.spatial_merge_size ** 2
  special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
             cfg.vision_end_token_id}
  words = [i for i in range(min(cfg.text.vocab_size, 1000)) if i not in special]
  text = lambda n: list(rng.choice(words, n))
  row0 = text(5) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + \
      [cfg.vision_end_token_id] + text(7)
  row1 = text(9)
  ids, mask = processing.left_pad([np.array(row0), np.array(row1)], pad_id=words[0])
  return ParityInputs(ids, mask, pixel_values, (tuple(int(v) for v in grid),),
                      "token ids built from config.json's special ids (no tokenizer files)")


def _internvl_inputs(directory, cfg, rng, image, prompt, tokenizer_files) -> ParityInputs:
  """The same two rows for InternVL: its processor (tiles + <img> prompt) when the directory has
  a tokenizer and image settings, else tiles of the random image and ids from config.json."""
  from jigsaw_jax.models import processing
  from jigsaw_jax.models.internvl import processing as internvl_processing
  if tokenizer_files and (directory / "preprocessor_config.json").is_file():
    proc = internvl_processing.processor_for(cfg, str(directory))
    rows = [proc.encode_prompt(prompt, image), proc.encode_prompt("Hi.", None)]
    ids, mask = processing.left_pad([r.input_ids for r in rows], proc.pad_token_id)
    return ParityInputs(ids, mask, rows[0].pixel_values,
                        tuple(map(tuple, rows[0].image_grid_thw.tolist())),
                        "the directory's tokenizer, chat template and tiling")
  v = cfg.vision
  pixels = internvl_processing.preprocess_image(image, internvl_processing.TilingConfig(
      image_size=v.image_size, tokens_per_tile=v.tokens_per_tile))
  special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
  words = [i for i in range(min(cfg.text.vocab_size, 1000)) if i not in special]
  text = lambda n: list(rng.choice(words, n))
  row0 = text(5) + [cfg.vision_start_token_id] + [cfg.image_token_id] * (
      len(pixels) * v.tokens_per_tile) + [cfg.vision_end_token_id] + text(7)
  ids, mask = processing.left_pad([np.array(row0), np.array(text(9))], pad_id=words[0])
  return ParityInputs(ids, mask, pixels, ((len(pixels), 1, 1),),
                      "tiles of a random image, ids from config.json (no tokenizer files)")


def _image_config(cfg, processing):
  v = cfg.vision
  return processing.ImageProcessingConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                          temporal_patch_size=v.temporal_patch_size)


def our_logits(directory: pathlib.Path, inputs: ParityInputs):
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  from jigsaw_jax.models import hf_io, mllm
  params, cfg = hf_io.load_hf(directory, dtype="float32", param_dtype="float32")
  index = mllm.rope_index(cfg, inputs.input_ids, inputs.image_grid_thw, inputs.attn_mask)
  model = mllm.VisionLanguageModel(cfg)
  forward = jax.jit(lambda p, ids, pos, mask, pix: model.apply(
      p, ids, pos, mask, pix, inputs.image_grid_thw).logits)
  logits = np.asarray(forward(params, inputs.input_ids, index.positions, inputs.attn_mask,
                              inputs.pixel_values))
  return logits, index


def reference_logits(directory: pathlib.Path, inputs: ParityInputs, cfg) -> np.ndarray:
  import torch
  import transformers
  model_cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
               "internvl": transformers.InternVLForConditionalGeneration}[cfg.vision.kind]
  model = model_cls.from_pretrained(str(directory), dtype=torch.float32).eval()
  ids = torch.tensor(inputs.input_ids, dtype=torch.long)
  if cfg.vision.kind == "internvl":  # 1-D RoPE over real tokens, as its generate() numbers them
    mask = torch.tensor(inputs.attn_mask, dtype=torch.long)
    side = cfg.vision.image_size
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   pixel_values=torch.tensor(inputs.pixel_values).reshape(-1, 3, side, side)
                   ).logits.float().numpy()
  with torch.no_grad():
    out = model(
        input_ids=ids, attention_mask=torch.tensor(inputs.attn_mask, dtype=torch.long),
        pixel_values=torch.tensor(inputs.pixel_values),
        image_grid_thw=torch.tensor(inputs.image_grid_thw, dtype=torch.long),
        mm_token_type_ids=(ids == cfg.image_token_id).long())
  return out.logits.float().numpy()


def compare(directory, tol: float = 1e-4, seed: int = 0, height: int = 84, width: int = 112,
            prompt: str = "Describe the picture.", verbose: bool = True) -> float:
  """Runs both models on the same inputs; returns max |Δlogits| over real tokens."""
  from jigsaw_jax.models import hf_io
  directory = pathlib.Path(directory)
  cfg = hf_io.model_config_from_hf(hf_io.read_config(directory))
  inputs = build_inputs(directory, cfg, seed=seed, height=height, width=width, prompt=prompt)
  ours, index = our_logits(directory, inputs)
  gc.collect()
  ref = reference_logits(directory, inputs, cfg)
  real = inputs.attn_mask.astype(bool)
  diff = float(np.max(np.abs(ours - ref)[real]))
  if verbose:
    print(f"checkpoint:      {directory}  ({cfg.vision.kind}, {cfg.text.num_layers} layers, "
          f"vocab {cfg.text.vocab_size})")
    print(f"inputs:          {inputs.input_ids.shape[0]} rows x {inputs.input_ids.shape[1]} tokens, "
          f"image grid {inputs.image_grid_thw}; {inputs.source}")
    print(f"rope deltas:     {index.deltas.tolist()}")
    print(f"max |logits|:    {float(np.max(np.abs(ref)[real])):.4g}")
    agree = float(np.mean(ours.argmax(-1)[real] == ref.argmax(-1)[real]))
    print(f"argmax agree:    {agree:.4f}")
    print(f"max |Δlogits|:   {diff:.3e}  (tolerance {tol:g}): {'PASS' if diff <= tol else 'FAIL'}")
  return diff


def main(argv: Optional[list] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + "
                      "safetensors), e.g. one written by save_pretrained.")
  parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |Δlogits| (fp32).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--height", type=int, default=84, help="random image height (pixels).")
  parser.add_argument("--width", type=int, default=112, help="random image width (pixels).")
  parser.add_argument("--prompt", default="Describe the picture.")
  args = parser.parse_args(argv)
  diff = compare(args.hf, args.tol, args.seed, args.height, args.width, args.prompt)
  return 0 if diff <= args.tol else 1


if __name__ == "__main__":
  sys.exit(main())
