"""The reference's test set from a local Hugging Face dataset export (jigsaw-r1/coco, split test):
save_to_disk and parquet layouts, read by the folder source's test split for evaluation."""

from __future__ import annotations

import os

import datasets
import numpy as np
import pytest
from PIL import Image

from jigsaw_jax import data
from jigsaw_jax.data import hf_dataset
from tests.data.test_folder import _eval_originals, _folder_config, _which, _write_split


def _image_dataset(pool):
  """A dataset like jigsaw-r1/coco: an `image` column (Image feature) and an id."""
  return datasets.Dataset.from_dict(
      {"image": [Image.fromarray(image) for image in pool.values()],
       "image_id": list(range(len(pool)))}).cast_column("image", datasets.Image())


@pytest.fixture
def splits(tmp_path):
  train = _write_split(str(tmp_path / "train2014"), 5, seed=11)
  test = _write_split(str(tmp_path / "test_images"), 4, seed=12)
  other = _write_split(str(tmp_path / "other_images"), 2, seed=13)
  return tmp_path, train, test, other


def test_eval_reads_the_test_split_of_a_save_to_disk_export(splits):
  tmp_path, train, test, other = splits
  export = str(tmp_path / "jigsaw-r1-coco")
  datasets.DatasetDict({"test": _image_dataset(test), "train": _image_dataset(other)}).save_to_disk(
      export)
  config = _folder_config(str(tmp_path / "train2014"), test_hf_dataset=export)
  used = set()
  for original in _eval_originals(config, 8):
    assert not _which(original, train) and not _which(original, other)
    (path,) = _which(original, test)
    used.add(path)
  assert used == set(test)
  source = data.make_image_source(dict(config.source, split="test"))
  assert len(source) == 4 and source[2].dtype == np.uint8
  with pytest.raises(ValueError, match=r"has the splits \['test', 'train'\], not 'validation'"):
    data.make_image_source(dict(config.source, split="test", test_hf_split="validation"))


def test_parquet_layouts_of_the_hub(splits):
  tmp_path, _, test, other = splits
  root = tmp_path / "snapshot"
  os.makedirs(root / "data")
  _image_dataset(test).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
  _image_dataset(other).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
  for where in (root, root / "data" / "test-00000-of-00001.parquet"):
    source = hf_dataset.HfDatasetSource(str(where))
    assert len(source) == 4
    for i, image in enumerate(test.values()):
      np.testing.assert_array_equal(source[i], image)
  with pytest.raises(ValueError, match=r"no parquet files of split 'valid'.*data/test-00000"):
    hf_dataset.HfDatasetSource(str(root), split="valid")
  with pytest.raises(ValueError, match=r"no column 'img'; its columns are \['image', 'image_id'\]"):
    hf_dataset.HfDatasetSource(str(root), image_key="img")
  with pytest.raises(ValueError, match="does not exist"):
    hf_dataset.HfDatasetSource(str(tmp_path / "nowhere"))
