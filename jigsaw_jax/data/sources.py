"""`make_image_source(config.data.source)`: the one place that turns a source config into a source."""

from __future__ import annotations

from typing import Any, Mapping, Union

import ml_collections

from jigsaw_jax.data import config as config_lib
from jigsaw_jax.data.bundled import BundledSource
from jigsaw_jax.data.folder import FolderSource
from jigsaw_jax.data import folder as folder_lib
from jigsaw_jax.data import images
from jigsaw_jax.data.images import ImageSource
from jigsaw_jax.data.procedural import ProceduralSource

KINDS = ("bundled", "procedural", "folder", "tfds")


def make_image_source(
    config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> ImageSource:
  """Builds the image source that `config.kind` names (fields: see `jigsaw_jax.data.config`)."""
  c = config_lib.merged_fields(config, config_lib.source_config(), "config.data.source")
  kind = c["kind"]
  if kind == "bundled":
    return BundledSource(
        split=c["split"], image_size=c["image_size"], seed=c["seed"], min_scale=c["min_scale"],
        test_fraction=c["test_fraction"], hflip=c["hflip"], photos=c["photos"],
        min_detail=c["min_detail"], same_scale=c["same_scale"], vflip=c["vflip"],
        min_contrast=c["min_contrast"], train_photos=c["train_photos"])
  if kind == "procedural":
    return ProceduralSource(split=c["split"], image_size=c["image_size"], seed=c["seed"])
  if kind == "folder":
    return _folder_split(c)
  if kind == "tfds":
    from jigsaw_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    return TfdsSource(
        name=c["name"], split=c["split"], data_dir=c["data_dir"] or None,
        image_key=c["image_key"], image_size=c["image_size"])
  raise ValueError(f"config.data.source.kind must be one of {KINDS}; got {kind!r}.")


NO_TEST_SPLIT = (
    "config.data.source.kind=folder has no test split configured, and evaluation must not cut its "
    "puzzles from the training images in config.data.source.path. Give the test images as one of: "
    "config.data.source.test_hf_dataset=/data/jigsaw-r1-coco (a local save_to_disk or parquet "
    "export of the reference's test set, Hugging Face dataset jigsaw-r1/coco, split test), "
    "config.data.source.test_path=/data/coco/test2014 (a folder), or "
    "config.data.source.test_file_list=/data/coco/test.json (a JSON list of paths, relative to "
    "test_path, else to path).")


def _folder_split(c: dict) -> ImageSource:
  """split=train: `path`/`file_list`. split=test: `test_hf_dataset`, else the folder
  `test_path`/`test_file_list`, which may share no file with the train split; none: an error."""
  split = c["split"]
  images.check_split(split, "folder")
  options = dict(image_size=c["image_size"], validate=c["validate"],
                 extensions=tuple(c["extensions"]))
  if split == "train":
    return FolderSource(path=c["path"], file_list=c["file_list"] or None, **options)
  if c["test_hf_dataset"]:
    from jigsaw_jax.data.hf_dataset import HfDatasetSource  # pylint: disable=g-import-not-at-top
    return HfDatasetSource(c["test_hf_dataset"], split=c["test_hf_split"],
                           image_key=c["image_key"], image_size=c["image_size"])
  if not (c["test_path"] or c["test_file_list"]):
    raise ValueError(NO_TEST_SPLIT)
  test = FolderSource(path=c["test_path"] or c["path"], file_list=c["test_file_list"] or None,
                      **options)
  if c["path"]:
    folder_lib.refuse_shared_files(
        folder_lib.candidate_paths(c["path"], c["file_list"] or None, options["extensions"]),
        test.paths)
  return test
