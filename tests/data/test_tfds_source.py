"""The tfds source on a tiny dataset that the test prepares itself, offline, as array_record."""

import numpy as np
import pytest

from jigsaw_jax import data

tfds = pytest.importorskip("tensorflow_datasets")

TRAIN_SIZES = [(20, 30), (24, 18), (16, 16), (30, 20), (18, 26)]
TEST_SIZES = [(22, 22), (26, 14), (14, 28)]


def _pixels(split, index, size):
  rng = np.random.default_rng([0 if split == "train" else 1, index])
  return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Prepares `tiny_images` (5 train, 3 test PNG images) into a fresh data_dir."""
  # Not registered: the source must then read it as any prepared dataset whose code is absent
  # (for example coco/2017 prepared elsewhere), through tfds' read-only builder.
  with tfds.core.registered.skip_registration():

    class TinyImages(tfds.core.GeneratorBasedBuilder):
      """A handful of random images of different sizes."""

      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "id": np.int64,
        }))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples("train", TRAIN_SIZES),
                "test": self._generate_examples("test", TEST_SIZES)}

      def _generate_examples(self, split, sizes):
        for i, size in enumerate(sizes):
          yield i, {"image": _pixels(split, i, size), "id": i}

  directory = str(tmp_path_factory.mktemp("tfds"))
  TinyImages(data_dir=directory, file_format="array_record").download_and_prepare()
  return directory


def _expected(split, sizes):
  return sorted(_pixels(split, i, s).tobytes() for i, s in enumerate(sizes))


def test_tfds_source_reads_every_image_of_the_split(data_dir):
  for split, sizes in (("train", TRAIN_SIZES), ("test", TEST_SIZES)):
    source = data.make_image_source(
        {"kind": "tfds", "name": "tiny_images", "split": split, "data_dir": data_dir,
         "image_size": None})
    assert len(source) == len(sizes)
    read = [source[i] for i in range(len(source))]
    assert all(image.dtype == np.uint8 and image.ndim == 3 for image in read)
    # PNG is lossless: the very pixels that were written come back (tfds may reorder records).
    assert sorted(image.tobytes() for image in read) == _expected(split, sizes)
    for i in range(len(source)):
      np.testing.assert_array_equal(source[i], read[i])


def test_tfds_source_resizes_and_feeds_the_pipeline(data_dir):
  config = data.default_config()
  config.source.update(kind="tfds", name="tiny_images:1.0.0", split="train[:4]",
                       data_dir=data_dir, image_size=(16, 12))
  config.pipeline.update(prompts_per_batch=2, group_size=3, num_prompts=8, resize_to=(16, 12))
  batches = list(data.make_dataset(config))
  assert len(batches) == 4
  assert all(b["image"].shape == (6, 16, 12, 3) for b in batches)
  indices = np.concatenate([b["image_index"][::3] for b in batches])
  assert sorted(indices[:4]) == sorted(indices[4:]) == [0, 1, 2, 3]


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError) as error:
    data.TfdsSource("no_such_images", data_dir=str(tmp_path))
  message = str(error.value)
  assert "no_such_images" in message and str(tmp_path) in message
  assert "--file_format=array_record" in message


def test_unknown_image_key_lists_the_features(data_dir):
  with pytest.raises(ValueError, match=r"no feature 'picture'.*\['id', 'image'\]"):
    data.TfdsSource("tiny_images", data_dir=data_dir, image_key="picture")


def test_dataset_without_random_access_says_how_to_convert_it(tmp_path):
  with tfds.core.registered.skip_registration():

    class TinyRecords(tfds.core.GeneratorBasedBuilder):
      """Two images stored as TFRecord, which has no random access."""

      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3))}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(2):
          yield i, {"image": _pixels("train", i, (8, 8))}

  TinyRecords(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  with pytest.raises(ValueError, match=r"stored as tfrecord.*tfds convert_format"):
    data.TfdsSource("tiny_records", data_dir=str(tmp_path))
