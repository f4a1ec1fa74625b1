"""Small helpers shared by the image sources: per-index RNG streams, decoding and resizing.

Every source is a pure function of (seed, split, index). The helpers here make that easy to keep:
randomness comes only from `index_rng`, and decoding/resizing go through PIL with fixed filters so
the same bytes always give the same pixels.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import zlib
from typing import Callable, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ImageSize = Tuple[int, int]  # (height, width), as numpy orders them

SPLITS = ("train", "test")


class ImageSource(Protocol):
  """What the pipeline reads: random access to uint8 [H, W, 3] images.

  `len(source)` is the number of distinct images; the unlimited sources (bundled crops, procedural
  images) report a large number and make a new image for every index.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> np.ndarray:
    ...


def index_rng(seed: int, stream: str, index: int) -> np.random.Generator:
  """A generator that depends only on (seed, stream, index) and touches no global state.

  `stream` separates independent uses of the same seed (for example "bundled/train" and
  "bundled/test"), so two splits never draw the same numbers. crc32 rather than `hash` because
  Python salts string hashes per process.
  """
  return np.random.default_rng(
      np.random.SeedSequence([int(seed), zlib.crc32(stream.encode("utf-8")), int(index)]))


def check_split(split: str, kind: str) -> int:
  """Returns the split's number; errors name the valid splits."""
  if split not in SPLITS:
    raise ValueError(
        f"The {kind} image source has the splits {SPLITS}; got split={split!r}. "
        f"Set config.data.source.split to one of them.")
  return SPLITS.index(split)


def check_image_size(image_size: Optional[Sequence[int]], kind: str, required: bool = False,
                     field: str = "config.data.source.image_size") -> Optional[ImageSize]:
  """Normalises an image size to a (height, width) tuple of positive ints, or None (native)."""
  if image_size is None:
    if required:
      raise ValueError(f"The {kind} image source needs {field}=(height, width), e.g. (112, 112).")
    return None
  size = tuple(int(x) for x in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"{field} must be (height, width) with positive ints; got {image_size!r}.")
  return size  # type: ignore[return-value]


def to_rgb_uint8(image: Union[np.ndarray, Image.Image]) -> np.ndarray:
  """Any PIL image or uint8 array (grey, RGB, RGBA) as a contiguous uint8 [H, W, 3] array."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image; got dtype {array.dtype} and shape {array.shape}.")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Expected an image of shape [H, W], [H, W, 1|3|4]; got {array.shape}.")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


def decode_image(data: Union[bytes, str, os.PathLike]) -> np.ndarray:
  """Decodes encoded bytes or a file fully (a truncated file raises) to uint8 [H, W, 3]."""
  source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  with Image.open(source) as image:
    image.load()  # Decode now, so truncation surfaces here and not in a later thread.
    return to_rgb_uint8(image)


def resize(image: np.ndarray, size: Optional[ImageSize]) -> np.ndarray:
  """Resizes to exactly (height, width) with PIL's antialiased bicubic filter; None keeps it."""
  if size is None or tuple(image.shape[:2]) == tuple(size):
    return image
  height, width = size
  resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC)
  return np.asarray(resized, dtype=np.uint8)


class FallbackReader:
  """Reads item i, or the next readable one after it, and reports each unreadable item once.

  Used by the sources that read files or records which may turn out broken. Falling forward to the
  next readable item is deterministic: whether an item decodes depends only on its bytes, not on
  when or in which thread it was first tried. Thread-safe; pickles without its lock.
  """

  def __init__(self, owner: str, skipped: Optional[list] = None):
    self.owner = owner  # how log lines name the source
    self.skipped: list = list(skipped or [])  # (name, reason) of every item left out
    self._bad: set = set()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def read(self, index: int, length: int, read: Callable[[int], np.ndarray],
           describe: Callable[[int, Exception], Tuple[str, str]]) -> np.ndarray:
    """`read(i)` for the first i >= index (wrapping around) that does not raise.

    Args:
      index: the item asked for.
      length: how many items there are.
      read: decodes item i or raises.
      describe: (name, reason) of item i for the log, given the error it raised.
    """
    for offset in range(length):
      candidate = (index + offset) % length
      if candidate in self._bad:
        continue
      try:
        return read(candidate)
      except Exception as error:  # pylint: disable=broad-except  (skip it, never crash a run)
        self._mark_bad(candidate, *describe(candidate, error))
    raise RuntimeError(
        f"{self.owner}: none of its {length} items could be decoded ({len(self.skipped)} skipped). "
        "Check that the files are readable and were not changed during the run.")

  def _mark_bad(self, index: int, name: str, reason: str) -> None:
    with self._lock:
      if index in self._bad:
        return
      self._bad.add(index)
      self.skipped.append((name, reason))
      logger.warning("%s: skipped %s (%s) when reading it; using the next readable item instead. "
                     "%d skipped in all.", self.owner, name, reason, len(self.skipped))
