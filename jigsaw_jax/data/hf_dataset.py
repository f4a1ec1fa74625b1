"""Images from a local Hugging Face dataset export, such as the reference's test set.

Jigsaw-R1 evaluates on `jigsaw-r1/coco`, split "test": 1,000 COCO test2014 images in an `image`
column. Nothing is downloaded here; give a local copy made once where the hub is reachable,
either of

    datasets.load_dataset("jigsaw-r1/coco").save_to_disk("/data/jigsaw-r1-coco")   # save_to_disk
    huggingface-cli download jigsaw-r1/coco --repo-type dataset --local-dir ...      # parquet

and point `config.data.source.test_hf_dataset` at it. Accepted layouts: a `save_to_disk` directory
(of a DatasetDict, whose `split` is taken, or of one Dataset), a parquet file, or a directory of
parquet files where those of the split are named `<split>-*.parquet` or lie under a `<split>/`
folder (the hub's layout, e.g. data/test-00000-of-00001.parquet).

Images are decoded here from the stored bytes (PIL, as the folder source), so a broken record is
skipped and reported like a broken file, never crashing a run.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import datasets
import numpy as np

from jigsaw_jax.data import images


def _parquet_files_of_split(root: str, split: str) -> Tuple[List[str], List[str]]:
  """(files of `split`, every parquet file found) under `root`, sorted."""
  found = []
  for directory, subdirs, files in os.walk(root, followlinks=True):
    subdirs.sort()
    found.extend(os.path.join(directory, f) for f in files if f.endswith(".parquet"))
  found.sort()
  names = lambda f: (os.path.basename(f), os.path.relpath(os.path.dirname(f), root).split(os.sep))
  chosen = [f for f in found
            if names(f)[0].startswith(f"{split}-") or names(f)[0] == f"{split}.parquet"
            or split in names(f)[1]]
  return chosen, found


def load_split(path: str, split: str = "test") -> datasets.Dataset:
  """The `split` of the local export at `path` (see the module docstring for the layouts)."""
  where = os.path.abspath(os.path.expanduser(path))
  field = "config.data.source.test_hf_dataset"
  if not os.path.exists(where):
    raise ValueError(f"{field}={path!r} does not exist (resolved to {where!r}). Point it at a "
                     "local export of jigsaw-r1/coco: a save_to_disk directory or its parquet "
                     "files.")
  if os.path.isfile(where):
    if not where.endswith(".parquet"):
      raise ValueError(f"{field}={path!r} is a file but not .parquet; give a parquet file or a "
                       "save_to_disk directory.")
    return datasets.Dataset.from_parquet(where)
  if os.path.isfile(os.path.join(where, "dataset_dict.json")):
    splits = datasets.load_from_disk(where)
    if split not in splits:
      raise ValueError(f"The dataset saved at {where!r} has the splits {sorted(splits)}, not "
                       f"{split!r}; set config.data.source.test_hf_split to one of them.")
    return splits[split]
  if os.path.isfile(os.path.join(where, "state.json")):
    return datasets.load_from_disk(where)  # a single saved Dataset: the split itself
  chosen, found = _parquet_files_of_split(where, split)
  if not chosen:
    names = ", ".join(os.path.relpath(f, where) for f in found[:10]) or "none"
    raise ValueError(
        f"{field}={path!r} holds no parquet files of split {split!r} (named {split}-*.parquet or "
        f"under a {split}/ folder); parquet files found: {names}. Set "
        "config.data.source.test_hf_split, or point the field at the split's file.")
  return datasets.Dataset.from_parquet(chosen)


class HfDatasetSource:
  """Random access to the images of one split of a local HF dataset export; uint8 [H, W, 3].

  Args:
    path: the export (see the module docstring).
    split: the split to read ("test" for jigsaw-r1/coco).
    image_key: the column holding the images (an `Image` feature, or encoded bytes).
    image_size: (height, width) to resize every image to, or None for native sizes.
  """

  def __init__(self, path: str, split: str = "test", image_key: str = "image",
               image_size: Optional[Sequence[int]] = None):
    self.path, self.split = path, split
    self.image_size = images.check_image_size(image_size, "HF dataset")
    table = load_split(path, split)
    if image_key not in table.column_names:
      raise ValueError(f"The dataset at {path!r} (split {split!r}) has no column {image_key!r}; "
                       f"its columns are {table.column_names}. Set config.data.source.image_key.")
    if isinstance(table.features[image_key], datasets.Image):
      table = table.cast_column(image_key, datasets.Image(decode=False))
    self._column = table.select_columns([image_key])
    self._key = image_key
    if len(self._column) == 0:
      raise ValueError(f"The dataset at {path!r} (split {split!r}) has no rows.")
    self._reader = images.FallbackReader(f"HF dataset source {path!r} ({split})")

  @property
  def skipped(self) -> List[Tuple[str, str]]:
    return self._reader.skipped

  def __len__(self) -> int:
    return len(self._column)

  def __repr__(self) -> str:
    return (f"HfDatasetSource({self.path!r}, split={self.split!r}, {len(self)} images, "
            f"image_size={self.image_size})")

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"HfDatasetSource index {index} is outside [0, {len(self)}).")
    return self._reader.read(index, len(self), self._read, self._describe)

  def _read(self, index: int) -> np.ndarray:
    value = self._column[index][self._key]
    if isinstance(value, dict):  # an Image feature read undecoded: {"bytes": ..., "path": ...}
      value = value.get("bytes") or value.get("path")
    return images.resize(images.decode_image(value), self.image_size)

  def _describe(self, index: int, error: Exception) -> Tuple[str, str]:
    return f"row {index}", f"{type(error).__name__}: {error}"
