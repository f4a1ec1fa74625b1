"""`make_image_source(config.data.source)`: the one place that turns a source config into a source."""

from __future__ import annotations

from typing import Any, Mapping, Union

import ml_collections

from jigsaw_jax.data import config as config_lib
from jigsaw_jax.data.bundled import BundledSource
from jigsaw_jax.data.folder import FolderSource
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
    return FolderSource(
        path=c["path"], file_list=c["file_list"] or None, image_size=c["image_size"],
        validate=c["validate"], extensions=tuple(c["extensions"]))
  if kind == "tfds":
    from jigsaw_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    return TfdsSource(
        name=c["name"], split=c["split"], data_dir=c["data_dir"] or None,
        image_key=c["image_key"], image_size=c["image_size"])
  raise ValueError(f"config.data.source.kind must be one of {KINDS}; got {kind!r}.")
