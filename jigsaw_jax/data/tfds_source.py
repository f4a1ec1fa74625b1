"""Images from a prepared TensorFlow Datasets dataset (for example `coco/2017`), read offline.

Random access needs the dataset prepared in the array_record file format (tfds' `as_data_source`);
reading it needs no TensorFlow and no network. Images are fetched as encoded bytes and decoded
with PIL here, so a broken record is skipped (falling forward to the next one) exactly like a
broken file in the folder source.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

from jigsaw_jax.data import images


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"Prepare it once on a machine with network, e.g. `tfds build {name} "
          f"--data_dir={data_dir} --file_format=array_record`, and copy {data_dir!r} here")


class TfdsSource:
  """Random access to one split of a prepared tfds dataset; `source[i]` is uint8 [H, W, 3].

  Args:
    name: dataset name with optional config and version, e.g. "coco/2017" or "coco/2017:1.1.0".
    split: a tfds split, slices included ("train", "validation", "train[:10%]").
    data_dir: the folder holding prepared datasets (default: tfds' own, ~/tensorflow_datasets).
    image_key: the feature that holds the image.
    image_size: (height, width) to resize to, or None for native sizes.
  """

  def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
               image_key: str = "image", image_size: Optional[Sequence[int]] = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy, optional)

    if not name:
      raise ValueError("The tfds image source needs config.data.source.name, e.g. 'coco/2017'.")
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    shown_dir = data_dir or "~/tensorflow_datasets"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(
          f"No tfds dataset {name!r} is prepared under data_dir={shown_dir!r}. "
          f"{_prepare_hint(name, shown_dir)}, or set config.data.source.data_dir.") from None
    if not builder.is_prepared():
      raise ValueError(
          f"The tfds dataset {name!r} is not prepared under data_dir={shown_dir!r} and nothing is "
          f"downloaded at run time. {_prepare_hint(name, shown_dir)}.")
    file_format = builder.info.file_format
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if file_format is not None and file_format not in random_access:
      raise ValueError(
          f"The tfds dataset {name!r} under {shown_dir!r} is stored as {file_format.value}, which "
          "has no random access. Convert it once: `tfds convert_format --root_data_dir="
          f"{shown_dir} --out_file_format=array_record`, or rebuild with "
          "--file_format=array_record.")
    features = builder.info.features
    if image_key not in features:
      raise ValueError(
          f"The tfds dataset {name!r} has no feature {image_key!r}; set config.data.source.image_key "
          f"to one of {sorted(features.keys())}.")
    # Keep encoded images as bytes: PIL decodes them here, and a broken one is skipped.
    decoders = ({image_key: tfds.decode.SkipDecoding()}
                if isinstance(features[image_key], tfds.features.Image) else None)
    self._records = builder.as_data_source(split, decoders=decoders)
    if len(self._records) == 0:
      raise ValueError(f"Split {split!r} of tfds dataset {name!r} under {shown_dir!r} is empty; "
                       f"its splits are {sorted(builder.info.splits.keys())}.")
    self.name, self.split, self.image_key = name, split, image_key
    self.image_size = images.check_image_size(image_size, "tfds")
    self._reader = images.FallbackReader(f"tfds image source {name}[{split}]")

  @property
  def skipped(self) -> list:
    return self._reader.skipped

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} images, "
            f"image_size={self.image_size})")

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"TfdsSource index {index} is outside [0, {len(self)}).")
    return self._reader.read(index, len(self), self._read, self._describe)

  def _read(self, index: int) -> np.ndarray:
    value = self._records[index][self.image_key]
    if isinstance(value, (bytes, bytearray)):
      image = images.decode_image(value)
    else:
      image = images.to_rgb_uint8(np.asarray(value))
    return images.resize(image, self.image_size)

  def _describe(self, index: int, error: Exception) -> Tuple[str, str]:
    return f"record {index}", f"{type(error).__name__}: {error}"
