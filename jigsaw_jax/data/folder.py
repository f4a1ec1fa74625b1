"""Images from a directory tree of JPEG/PNG files (for example COCO train2014).

Broken files never crash a run. At construction every candidate is checked (by default it is
decoded, at 1/8 scale for JPEG, so truncation shows), the bad ones are left out, and one warning
line names them with the reason. A file that still fails later (it changed on disk, or validation
was switched off) is skipped at read time: `source[i]` falls back to the next readable file, which
is deterministic because whether a file decodes depends only on its bytes. Each such file is
reported once.

One FolderSource is one split. `make_image_source` builds the train split from
`config.data.source.path`/`file_list` and the test split from `test_path`/`test_file_list` (or a
Hugging Face dataset export, data/hf_dataset.py), and refuses a test split that shares a file with
the train split.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from jigsaw_jax.data import images

logger = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png")
VALIDATE_MODES = ("full", "header", "none")
_MAX_NAMES_IN_LOG = 20


def _reason(path: str, error: Exception) -> str:
  """A short, human reason for a file that does not decode."""
  if os.path.exists(path) and os.path.getsize(path) == 0:
    return "zero bytes"
  if isinstance(error, UnidentifiedImageError):
    return "not an image"
  if isinstance(error, FileNotFoundError):
    return "missing"
  if "truncated" in str(error):
    return "truncated"
  return f"{type(error).__name__}: {error}"


def _check_file(path: str, mode: str) -> Optional[str]:
  """None if the file is a readable image under `mode`, else the reason it is not."""
  try:
    if not os.path.isfile(path):
      return "missing"
    if mode == "none":
      return None
    if os.path.getsize(path) == 0:
      return "zero bytes"
    with Image.open(path) as image:
      if mode == "full":
        # JPEG can decode at 1/8 scale (several times faster); truncation still raises.
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    return None
  except Exception as error:  # pylint: disable=broad-except  (any failure means "skip it")
    return _reason(path, error)


def _list_candidates(root: str, file_list: Optional[str],
                     extensions: Sequence[str]) -> Tuple[List[str], str]:
  """The files to consider, in a fixed order, and a description of where they came from."""
  if file_list:
    list_path = os.path.expanduser(file_list)
    try:
      with open(list_path) as f:
        entries = json.load(f)
    except (OSError, ValueError) as error:
      raise ValueError(
          f"Could not read config.data.source.file_list={file_list!r} ({error}). It must be a JSON list "
          "of image paths, relative to config.data.source.path or absolute.") from error
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
      raise ValueError(
          f"config.data.source.file_list={file_list!r} must hold a JSON list of path strings; found "
          f"{type(entries).__name__}.")
    return [os.path.join(root, e) for e in entries], f"the {len(entries)} paths in {list_path!r}"
  suffixes = tuple(e.lower() for e in extensions)
  paths = []
  for directory, subdirs, files in os.walk(root, followlinks=True):
    subdirs.sort()
    paths.extend(os.path.join(directory, f) for f in files if f.lower().endswith(suffixes))
  return sorted(paths), f"files ending in {'/'.join(extensions)} under {root!r} (recursively)"


_WARNED: set = set()  # (root, file list, skipped paths) already reported


def candidate_paths(path: str, file_list: Optional[str] = None,
                    extensions: Sequence[str] = EXTENSIONS) -> List[str]:
  """The files a FolderSource over `path`/`file_list` would consider (not validated)."""
  return _list_candidates(os.path.abspath(os.path.expanduser(path)), file_list, extensions)[0]


def refuse_shared_files(train_paths: Sequence[str], test_paths: Sequence[str]) -> None:
  """A ValueError naming the files that are in both splits, if any (symlinks resolved)."""
  train = {os.path.realpath(p) for p in train_paths}
  shared = sorted(p for p in test_paths if os.path.realpath(p) in train)
  if shared:
    raise ValueError(
        f"The folder source's test split shares {len(shared)} of its {len(test_paths)} images "
        f"with the train split (first: {shared[:3]}); evaluation would score puzzles cut from "
        "training images. Point config.data.source.test_path/test_file_list at images that "
        "config.data.source.path/file_list do not hold.")


class FolderSource:
  """Random access to the readable images of a folder; `source[i]` is uint8 [H, W, 3].

  Args:
    path: the folder. Searched recursively unless `file_list` is given.
    file_list: optional JSON file holding a list of paths (relative to `path`, or absolute), like
      the reference's `train2014.json`; only these files are used, in this order.
    image_size: (height, width) to resize every image to, or None to keep native sizes (as the
      reference does).
    validate: "full" decodes every file once at construction (about 1 ms per COCO image per
      thread); "header" only opens headers (catches zero-byte and non-image files; truncated files
      are then skipped when read); "none" checks nothing until read.
    extensions: file name endings to pick up when searching (case-insensitive).
    num_threads: threads for validation (default: the number of CPUs, at most 16).
  """

  def __init__(self, path: str, file_list: Optional[str] = None,
               image_size: Optional[Sequence[int]] = None, validate: str = "full",
               extensions: Sequence[str] = EXTENSIONS, num_threads: Optional[int] = None):
    if validate not in VALIDATE_MODES:
      raise ValueError(
          f"config.data.source.validate must be one of {VALIDATE_MODES}; got {validate!r}.")
    if not path:
      raise ValueError("The folder image source needs config.data.source.path=/a/folder/of/images.")
    self.root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(self.root):
      raise ValueError(
          f"config.data.source.path={path!r} is not a directory (resolved to {self.root!r}). Point it "
          "at a folder of JPEG/PNG images, e.g. /data/coco/train2014.")
    self.image_size = images.check_image_size(image_size, "folder")
    candidates, where = _list_candidates(self.root, file_list, extensions)

    workers = num_threads or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      reasons = list(pool.map(lambda p: _check_file(p, validate), candidates))
    self.paths: List[str] = [p for p, r in zip(candidates, reasons) if r is None]
    skipped = [(p, r) for p, r in zip(candidates, reasons) if r]
    self._reader = images.FallbackReader(f"Folder image source {self.root!r}", skipped)

    if not self.paths:
      found = (f"found {len(candidates)} candidates, none readable (first: "
               f"{self._name(self.skipped[0][0])}: {self.skipped[0][1]})" if candidates
               else "found none")
      how = ("Check that the list's paths are relative to config.data.source.path (or absolute)"
             if file_list else
             f"Point config.data.source.path at a folder holding {'/'.join(extensions)} images")
      raise ValueError(
          f"The folder image source has no images: it looked for {where} and {found}. {how}.")
    # A run builds this source several times (training, pretraining, each eval set): the same
    # skipped files are reported once per process.
    warned = (self.root, file_list, tuple(p for p, _ in self.skipped))
    if self.skipped and warned not in _WARNED:
      _WARNED.add(warned)
      logger.warning(self._skip_message(len(candidates)))

  def _name(self, path: str) -> str:
    relative = os.path.relpath(path, self.root)
    return path if relative.startswith("..") else relative

  def _skip_message(self, num_candidates: int) -> str:
    shown = ", ".join(f"{self._name(p)} ({r})" for p, r in self.skipped[:_MAX_NAMES_IN_LOG])
    more = len(self.skipped) - _MAX_NAMES_IN_LOG
    if more > 0:
      shown += f", and {more} more (all in FolderSource.skipped)"
    return (f"Folder image source {self.root!r}: skipped {len(self.skipped)} of {num_candidates} "
            f"files that are not readable images: {shown}. Using the other {len(self.paths)}.")

  @property
  def skipped(self) -> List[Tuple[str, str]]:
    """(path, reason) of every file left out, at construction or later when read."""
    return self._reader.skipped

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return (f"FolderSource({self.root!r}, {len(self.paths)} images, {self.num_skipped} skipped, "
            f"image_size={self.image_size})")

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self.paths):
      raise IndexError(f"FolderSource index {index} is outside [0, {len(self.paths)}).")
    return self._reader.read(index, len(self.paths), self._read, self._describe)

  def _read(self, index: int) -> np.ndarray:
    return images.resize(images.decode_image(self.paths[index]), self.image_size)

  def _describe(self, index: int, error: Exception) -> Tuple[str, str]:
    return self.paths[index], _reason(self.paths[index], error)
