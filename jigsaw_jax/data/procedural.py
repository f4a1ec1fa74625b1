"""Generated images: a gradient background, a texture and a few solid shapes, new for every index.

A second unlimited source that needs no photos at all. The layers are chosen so that a jigsaw is
solvable: the gradient gives every patch a position cue, the shapes cross patch borders (their
edges must line up when the puzzle is solved), and the texture keeps patches from being flat.
Every image is a pure function of (seed, split, index); the splits use separate RNG streams.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from jigsaw_jax.data import images
from jigsaw_jax.data.bundled import UNLIMITED

TEXTURES = ("none", "stripes", "checker", "noise")
SHAPES = ("ellipse", "rectangle", "triangle")


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A linear or radial blend between two random colours, float32 [H, W, 3] in [0, 255]."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  ys, xs = ys / max(height - 1, 1), xs / max(width - 1, 1)
  if rng.random() < 0.7:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = xs * np.cos(angle) + ys * np.sin(angle)
  else:
    cy, cx = rng.uniform(0.0, 1.0, size=2)
    t = np.hypot(ys - cy, xs - cx)
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
  return start * (1.0 - t[..., None]) + end * t[..., None]


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A zero-mean texture in [-1, 1], float32 [H, W, 1] (or [H, W, 3] for colour noise)."""
  kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  if kind == "stripes":
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(4.0, max(6.0, min(height, width) / 3.0))
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    return np.sin(2.0 * np.pi * phase)[..., None]
  if kind == "checker":
    cell = int(rng.integers(3, max(4, min(height, width) // 4)))
    return ((((ys // cell) + (xs // cell)) % 2) * 2.0 - 1.0)[..., None]
  if kind == "noise":
    grid = int(rng.integers(3, 9))
    coarse = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0
  return np.zeros((height, width, 1), np.float32)


def _draw_shapes(rng: np.random.Generator, canvas: Image.Image) -> None:
  """Draws 2 to 6 solid shapes, some of them outlined, anywhere on the canvas."""
  width, height = canvas.size
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(2, 7))):
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    size_h = rng.uniform(0.15, 0.6) * height
    size_w = rng.uniform(0.15, 0.6) * width
    cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    outline = tuple(int(c) for c in rng.integers(0, 256, size=3)) if rng.random() < 0.5 else None
    box = [cx - size_w / 2, cy - size_h / 2, cx + size_w / 2, cy + size_h / 2]
    if kind == "ellipse":
      draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif kind == "rectangle":
      draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
      points = [(float(x), float(y)) for x, y in zip(
          rng.uniform(box[0], box[2], size=3), rng.uniform(box[1], box[3], size=3))]
      draw.polygon(points, fill=fill, outline=outline)


class ProceduralSource:
  """Unlimited generated images; `source[i]` is uint8 [image_size..., 3].

  Args:
    split: "train" or "test" (separate RNG streams: the same index gives different images).
    image_size: (height, width) of every image.
    seed: with (split, index), the only input to the image.
  """

  def __init__(self, split: str = "train", image_size: Sequence[int] = (112, 112), seed: int = 0):
    images.check_split(split, "procedural")
    self.image_size = images.check_image_size(image_size, "procedural", required=True)
    self.split, self.seed = split, int(seed)

  def __len__(self) -> int:
    return UNLIMITED

  def __repr__(self) -> str:
    return f"ProceduralSource(split={self.split!r}, image_size={self.image_size}, seed={self.seed})"

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < UNLIMITED:
      raise IndexError(f"ProceduralSource index {index} is outside [0, {UNLIMITED}).")
    rng = images.index_rng(self.seed, f"procedural/{self.split}", index)
    height, width = self.image_size
    pixels = _gradient(rng, height, width)
    pixels += rng.uniform(10.0, 50.0) * _texture(rng, height, width)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_shapes(rng, canvas)
    return np.asarray(canvas, dtype=np.uint8)
