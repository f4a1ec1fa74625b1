"""The default image source: random crops of the colour photos that ship inside installed packages.

Twelve real colour photos are available with no download: eight from scikit-image (astronaut,
chelsea, coffee, rocket, the left and right stereo motorcycle views, hubble_deep_field, retina,
immunohistochemistry), china and flower from scikit-learn, and matplotlib's grace_hopper; and four
greyscale ones from scikit-image (camera, coins, page, text) that are used only when named. Every
index draws its own crop (photo, scale, position, horizontal flip), so the supply of distinct images
is unlimited while the pixels stay real photographs. Training crops may also be flipped upside down
and lowered in contrast (`vflip`, `min_contrast`); test crops never are, so the held-out images stay
plain photographs.

Train/test split: each photo is cut along its longer side into two disjoint regions. The first
`1 - test_fraction` of the side (left part of a landscape photo, top part of a portrait one) is the
train region and the rest is the test region. A crop is taken wholly inside its split's region
before any resizing, so no train image shares a single source pixel with a test image.
`crop_box(index)` exposes the region and box of every index so a test can check this.
Photos named in `train_photos` have no test region: the train split crops them anywhere, the test
split never draws them, so they add training images without changing the held-out set.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from jigsaw_jax.data import images

# The number of distinct indices; large enough to be unlimited in practice and a valid int64.
UNLIMITED = 2**31


def _skimage(name: str, item: Optional[int] = None) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from skimage import data  # pylint: disable=g-import-not-at-top  (slow import, used lazily)
    image = getattr(data, name)()
    return image[item] if item is not None else image
  return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
    return load_sample_image(filename)
  return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    import matplotlib  # pylint: disable=g-import-not-at-top
    return images.decode_image(os.path.join(matplotlib.get_data_path(), "sample_data", filename))
  return load


PHOTO_LOADERS: Dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "retina": _skimage("retina"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
    # Greyscale photographs (returned with three equal channels), not used unless named.
    "camera": _skimage("camera"),
    "coins": _skimage("coins"),
    "page": _skimage("page"),
    "text": _skimage("text"),
}
PHOTO_NAMES: Tuple[str, ...] = tuple(PHOTO_LOADERS)
GREYSCALE_PHOTOS: Tuple[str, ...] = ("camera", "coins", "page", "text")
# The colour photos: what a source uses when no photos are named.
COLOUR_PHOTOS: Tuple[str, ...] = tuple(n for n in PHOTO_NAMES if n not in GREYSCALE_PHOTOS)


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
  """One bundled photo as uint8 [H, W, 3], loaded once per process (read-only)."""
  if name not in PHOTO_LOADERS:
    raise ValueError(
        f"Unknown bundled photo {name!r}; config.data.source.photos may name any of {PHOTO_NAMES}.")
  photo = images.to_rgb_uint8(PHOTO_LOADERS[name]())
  photo.setflags(write=False)
  return photo


@dataclasses.dataclass(frozen=True)
class Region:
  """A rectangle of a photo, in pixels: rows [top, top+height), columns [left, left+width)."""

  top: int
  left: int
  height: int
  width: int

  def overlaps(self, other: "Region") -> bool:
    return (self.top < other.top + other.height and other.top < self.top + self.height and
            self.left < other.left + other.width and other.left < self.left + self.width)

  def contains(self, other: "Region") -> bool:
    return (self.top <= other.top and other.top + other.height <= self.top + self.height and
            self.left <= other.left and other.left + other.width <= self.left + self.width)


@dataclasses.dataclass(frozen=True)
class Crop:
  """Where the image of one index comes from."""

  photo: str
  box: Region
  flip: bool
  vflip: bool = False  # upside down (train split only)
  contrast: float = 1.0  # factor on the deviation from the crop's mean colour (train split only)


def split_region(photo_shape: Sequence[int], split: str, test_fraction: float) -> Region:
  """The part of a photo that belongs to `split` (see the module docstring)."""
  height, width = int(photo_shape[0]), int(photo_shape[1])
  along_width = width >= height
  side = width if along_width else height
  cut = int(round(side * (1.0 - test_fraction)))
  start, length = (0, cut) if split == "train" else (cut, side - cut)
  if along_width:
    return Region(top=0, left=start, height=height, width=length)
  return Region(top=start, left=0, height=length, width=width)


class BundledSource:
  """Unlimited crops of the bundled photos; `source[i]` is uint8 [image_size..., 3].

  Args:
    split: "train" or "test"; the two never share a source pixel.
    image_size: (height, width) of every output image; the crop has the same aspect ratio, so
      nothing is stretched.
    seed: with (split, index), the only input to the crop choice.
    min_scale: the smallest crop side as a fraction of the largest crop that fits the region
      (1.0: always the largest crop, so only position and flip vary).
    test_fraction: share of each photo's longer side kept for the test split.
    hflip: flip half of the crops left-right.
    photos: names from `PHOTO_NAMES` to use in both splits (None: the colour photos).
    train_photos: more names from `PHOTO_NAMES`, drawn by the train split only and cropped from
      the whole photo (the test split never sees them, so the held-out set does not change):
      more distinct training images against memorising a few photos. Measured on the
      miniature, the four greyscale photos delayed supervised learning and ended no better
      (README), so it names none.
    same_scale: measure every crop against the largest crop that fits in BOTH splits' regions
      (the narrower test region), so train and test crops have one distribution of pixel scale.
      Off, each split measures against its own region: train crops (from 80% of a photo) are
      then mostly downsampled and sharp while test crops are upsampled and soft, a shift that
      widened the gap between a tiny 2x1 solver's train and held-out accuracy.
    min_detail: the least mean absolute difference between neighbouring pixels (0-255 scale,
      after resizing) a crop must have; flatter crops (out-of-focus background, night sky) are
      redrawn, deterministically, up to `MAX_DETAIL_TRIES` times, keeping the most detailed one.
      A jigsaw cut from a flat crop has no visible seam and no answer a model could find.
      Measured before any contrast change, so the augmentation below draws no other crops.
    vflip: flip half of the train crops upside down (the test split is never flipped so).
    min_contrast: scale each train crop's deviation from its mean colour by a factor drawn
      uniformly from [min_contrast, 1] (1.0: off; never applied to the test split). Aimed at
      the miniature's misses, which are mostly dim, flat held-out crops (coffee, grace_hopper);
      measured there, it slowed learning instead (README), so the miniature leaves it off.
  """

  def __init__(self, split: str = "train", image_size: Sequence[int] = (112, 112), seed: int = 0,
               min_scale: float = 0.35, test_fraction: float = 0.2, hflip: bool = True,
               photos: Optional[Sequence[str]] = None, min_detail: float = 0.0,
               same_scale: bool = False, vflip: bool = False, min_contrast: float = 1.0,
               train_photos: Sequence[str] = ()):
    images.check_split(split, "bundled")
    self.image_size = images.check_image_size(image_size, "bundled", required=True)
    if not 0.0 < min_scale <= 1.0:
      raise ValueError(f"config.data.source.min_scale must be in (0, 1]; got {min_scale}.")
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"config.data.source.test_fraction must be in (0, 1); got {test_fraction}.")
    self.photos = tuple(photos) if photos else COLOUR_PHOTOS
    self.train_photos = tuple(train_photos or ())
    unknown = sorted(set(self.photos + self.train_photos) - set(PHOTO_NAMES))
    if unknown:
      raise ValueError(f"Unknown bundled photos {unknown}; choose from {PHOTO_NAMES}.")
    both = sorted(set(self.photos) & set(self.train_photos))
    if both:
      raise ValueError(
          f"Photos {both} are in both config.data.source.photos (split into train and test "
          "regions) and config.data.source.train_photos (train only, whole); name each in one.")
    if not 0.0 < min_contrast <= 1.0:
      raise ValueError(
          f"config.data.source.min_contrast must be in (0, 1] (1.0 turns it off); got {min_contrast}.")
    self.split, self.seed = split, int(seed)
    self.min_scale, self.test_fraction, self.hflip = float(min_scale), float(test_fraction), hflip
    self.min_detail = float(min_detail)
    self.same_scale = bool(same_scale)
    self.vflip, self.min_contrast = bool(vflip), float(min_contrast)

  def __len__(self) -> int:
    return UNLIMITED

  def __repr__(self) -> str:
    return (f"BundledSource(split={self.split!r}, image_size={self.image_size}, seed={self.seed}, "
            f"{len(self.photos)} photos)")

  def region(self, photo: str) -> Region:
    shape = load_photo(photo).shape
    if photo in self.train_photos:  # only the train split draws these, from the whole photo
      return Region(top=0, left=0, height=int(shape[0]), width=int(shape[1]))
    return split_region(shape, self.split, self.test_fraction)

  def drawn_photos(self) -> Tuple[str, ...]:
    """The photos this split draws from, each equally often."""
    return self.photos + self.train_photos if self.split == "train" else self.photos

  def crop_box(self, index: int, attempt: int = 0) -> Crop:
    """The crop of `index`: a pure function of (seed, split, index, attempt)."""
    if not 0 <= index < UNLIMITED:
      raise IndexError(f"BundledSource index {index} is outside [0, {UNLIMITED}).")
    stream = f"bundled/{self.split}" + (f"/retry{attempt}" if attempt else "")
    rng = images.index_rng(self.seed, stream, index)
    drawn = self.drawn_photos()
    photo = drawn[int(rng.integers(len(drawn)))]
    region = self.region(photo)
    out_h, out_w = self.image_size
    # The largest crop with the output's aspect ratio that fits (in both splits' regions with
    # same_scale, this split's own included), then a random fraction of it. A train-only photo is
    # measured like the others (against the regions a split would give it), so its crops have the
    # same distribution of pixel scale.
    limits = ([split_region(load_photo(photo).shape, split, self.test_fraction)
               for split in ("train", "test")] if self.same_scale else [region])
    fit = min(min(limit.height / out_h, limit.width / out_w) for limit in limits)
    scale = fit * rng.uniform(self.min_scale, 1.0)
    crop_h = int(np.clip(round(out_h * scale), 1, region.height))
    crop_w = int(np.clip(round(out_w * scale), 1, region.width))
    top = region.top + int(rng.integers(region.height - crop_h + 1))
    left = region.left + int(rng.integers(region.width - crop_w + 1))
    flip = bool(self.hflip and rng.random() < 0.5)
    # Drawn after everything above, so turning the augmentation on leaves every crop box as it was.
    augment = self.split == "train"
    vflip = bool(augment and self.vflip and rng.random() < 0.5)
    contrast = (float(rng.uniform(self.min_contrast, 1.0))
                if augment and self.min_contrast < 1.0 else 1.0)
    return Crop(photo, Region(top, left, crop_h, crop_w), flip, vflip, contrast)

  def render(self, crop: Crop) -> np.ndarray:
    box = crop.box
    pixels = load_photo(crop.photo)[box.top:box.top + box.height, box.left:box.left + box.width]
    if crop.flip:
      pixels = pixels[:, ::-1]
    if crop.vflip:
      pixels = pixels[::-1]
    return images.resize(np.array(pixels), self.image_size)  # a copy: the photo is shared

  def chosen_crop(self, index: int) -> Tuple[Crop, np.ndarray]:
    """The crop of `index` after the min_detail redraws, and its rendering before contrast."""
    best = None
    best_detail = -1.0
    for attempt in range(MAX_DETAIL_TRIES if self.min_detail > 0 else 1):
      crop = self.crop_box(int(index), attempt)
      image = self.render(crop)
      if self.min_detail <= 0:
        return crop, image
      found = detail(image)
      if found >= self.min_detail:
        return crop, image
      if found > best_detail:
        best, best_detail = (crop, image), found
    return best

  def __getitem__(self, index: int) -> np.ndarray:
    crop, image = self.chosen_crop(index)
    return scale_contrast(image, crop.contrast)


MAX_DETAIL_TRIES = 16


def scale_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 image with its deviation from its mean colour multiplied by `factor`."""
  if factor == 1.0:
    return image
  x = image.astype(np.float32)
  mean = x.mean(axis=(0, 1), keepdims=True)
  return np.clip(np.round(mean + factor * (x - mean)), 0, 255).astype(np.uint8)


def detail(image: np.ndarray) -> float:
  """Mean absolute difference between vertically and horizontally neighbouring pixels."""
  x = image.astype(np.float32)
  return float((np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2)
