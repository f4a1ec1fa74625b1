"""The bundled and procedural sources: determinism, the train/test split, and the config factory."""

import random

import ml_collections
import numpy as np
import pytest

from jigsaw_jax import data
from jigsaw_jax.data import bundled


def _global_rng_states():
  return random.getstate(), np.random.get_state()[1].copy()


def _assert_same_global_rng(before):
  after = _global_rng_states()
  assert before[0] == after[0]
  np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("source_class", [data.BundledSource, data.ProceduralSource])
def test_same_seed_split_index_give_the_same_image(source_class):
  before = _global_rng_states()
  first, second = source_class("train", (40, 24), seed=3), source_class("train", (40, 24), seed=3)
  for index in [0, 1, 17, 2**31 - 1]:
    image = first[index]
    assert image.shape == (40, 24, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, second[index])
    np.testing.assert_array_equal(image, first[index])  # no hidden state between calls
  _assert_same_global_rng(before)


@pytest.mark.parametrize("source_class", [data.BundledSource, data.ProceduralSource])
def test_indices_seeds_and_splits_give_different_images(source_class):
  train = source_class("train", (32, 32), seed=0)
  images = [train[i] for i in range(8)]
  images.append(source_class("train", (32, 32), seed=1)[0])
  images.append(source_class("test", (32, 32), seed=0)[0])
  distinct = {image.tobytes() for image in images}
  assert len(distinct) == len(images)


@pytest.mark.parametrize("source_class", [data.BundledSource, data.ProceduralSource])
def test_unlimited_sources_reject_out_of_range_indices(source_class):
  source = source_class("train", (16, 16))
  assert len(source) == bundled.UNLIMITED
  with pytest.raises(IndexError):
    source[len(source)]
  with pytest.raises(IndexError):
    source[-1]


def test_every_bundled_photo_loads_offline_as_rgb():
  for name in bundled.PHOTO_NAMES:
    photo = bundled.load_photo(name)
    assert photo.ndim == 3 and photo.shape[-1] == 3 and photo.dtype == np.uint8, name
    # The colour photos are all at least 256 on a side; page and text are 191 and 172 high.
    least_side = 256 if name in bundled.COLOUR_PHOTOS else 160
    assert photo.shape[0] >= least_side and photo.shape[1] >= least_side, name
    assert photo.std() > 10, f"{name} looks flat"
    is_grey = np.array_equal(photo[..., 0], photo[..., 1]) and np.array_equal(
        photo[..., 0], photo[..., 2])
    assert is_grey == (name in bundled.GREYSCALE_PHOTOS), name
  assert len(bundled.COLOUR_PHOTOS) == 12 and len(bundled.PHOTO_NAMES) == 16


def test_bundled_train_and_test_regions_are_disjoint_and_cover_each_photo():
  train, test = data.BundledSource("train", (8, 8)), data.BundledSource("test", (8, 8))
  for name in bundled.PHOTO_NAMES:
    height, width = bundled.load_photo(name).shape[:2]
    train_region, test_region = train.region(name), test.region(name)
    assert not train_region.overlaps(test_region), name
    assert (train_region.height * train_region.width + test_region.height * test_region.width
            == height * width), name


@pytest.mark.parametrize("image_size", [(56, 28), (112, 112), (24, 64)])
def test_bundled_train_and_test_crops_never_share_a_source_pixel(image_size):
  train = data.BundledSource("train", image_size, min_scale=0.1)
  test = data.BundledSource("test", image_size, min_scale=0.1)
  train_boxes, test_boxes = {}, {}
  for index in range(300):
    for source, boxes in ((train, train_boxes), (test, test_boxes)):
      crop = source.crop_box(index)
      assert source.region(crop.photo).contains(crop.box), (source.split, index, crop)
      boxes.setdefault(crop.photo, []).append(crop.box)
  assert len(train_boxes) == len(test_boxes) == len(bundled.COLOUR_PHOTOS)  # the default photos
  for photo, boxes in train_boxes.items():
    for box in boxes:
      assert not any(box.overlaps(other) for other in test_boxes[photo]), photo


def _crop_scales(source, photo, count=400):
  """Crop side / output side of the first `count` crops of `photo` (the zoom of each crop)."""
  crops = [source.crop_box(i) for i in range(count)]
  return np.array([c.box.height / source.image_size[0] for c in crops if c.photo == photo])


def test_bundled_same_scale_gives_both_splits_one_crop_scale_distribution():
  # Without same_scale, train crops (from the wide train region) are far larger than test crops;
  # with it, both splits draw from the range the narrower test region allows.
  kwargs = dict(image_size=(98, 98), photos=("astronaut",))
  own = [_crop_scales(data.BundledSource(split, **kwargs), "astronaut") for split in ("train", "test")]
  same = [_crop_scales(data.BundledSource(split, same_scale=True, **kwargs), "astronaut")
          for split in ("train", "test")]
  assert np.median(own[0]) > 2.5 * np.median(own[1])
  assert abs(np.median(same[0]) / np.median(same[1]) - 1) < 0.1
  assert same[0].max() <= own[1].max() + 1e-9 and same[0].min() >= 0.35 * own[1].max() - 0.02
  # The test split is unchanged: its own region already is the narrower one.
  test_own = data.BundledSource("test", **kwargs)
  test_same = data.BundledSource("test", same_scale=True, **kwargs)
  assert all(test_own.crop_box(i) == test_same.crop_box(i) for i in range(50))


def test_bundled_output_is_the_resized_crop():
  source = data.BundledSource("train", (30, 20), hflip=True)
  for index in range(20):
    crop = source.crop_box(index)
    box = crop.box
    assert abs(box.width / box.height - 20 / 30) < 0.1  # aspect kept, nothing stretched
    pixels = bundled.load_photo(crop.photo)[box.top:box.top + box.height,
                                            box.left:box.left + box.width]
    if crop.flip:
      pixels = pixels[:, ::-1]
    expected = data.images.resize(np.array(pixels), (30, 20))
    np.testing.assert_array_equal(source[index], expected)


def test_bundled_photo_subset_and_unknown_photo():
  source = data.BundledSource("train", (16, 16), photos=("chelsea", "coffee"))
  assert {source.crop_box(i).photo for i in range(50)} == {"chelsea", "coffee"}
  with pytest.raises(ValueError, match="Unknown bundled photos"):
    data.BundledSource("train", (16, 16), photos=("lena",))


def test_train_photos_are_drawn_whole_by_train_only_and_leave_the_test_set_unchanged():
  kwargs = dict(image_size=(42, 42), photos=("chelsea", "coffee"), min_scale=0.2)
  extra = dict(train_photos=("camera", "page"))
  train = data.BundledSource("train", **kwargs, **extra)
  crops = [train.crop_box(i) for i in range(400)]
  assert {c.photo for c in crops} == {"chelsea", "coffee", "camera", "page"}
  for crop in (c for c in crops if c.photo in extra["train_photos"]):
    height, width = bundled.load_photo(crop.photo).shape[:2]
    assert train.region(crop.photo) == bundled.Region(0, 0, height, width)
  # Crops land in the part a test split would have had: the photo is train-only as a whole.
  camera = [c.box for c in crops if c.photo == "camera"]
  test_part = bundled.split_region(bundled.load_photo("camera").shape, "test", 0.2)
  assert any(box.overlaps(test_part) for box in camera)
  test = data.BundledSource("test", **kwargs, **extra)
  plain_test = data.BundledSource("test", **kwargs)
  assert all(test.crop_box(i) == plain_test.crop_box(i) for i in range(200))
  np.testing.assert_array_equal(test[7], plain_test[7])


def test_a_photo_in_both_lists_is_an_error_naming_both_fields():
  with pytest.raises(ValueError, match=r"\['coffee'\].*photos.*train_photos"):
    data.BundledSource("train", (16, 16), photos=("chelsea", "coffee"), train_photos=("coffee",))
  with pytest.raises(ValueError, match="Unknown bundled photos"):
    data.BundledSource("train", (16, 16), train_photos=("lena",))


def test_bad_split_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"\('train', 'test'\)"):
    data.ProceduralSource("validation", (16, 16))


def test_procedural_images_are_not_flat():
  source = data.ProceduralSource("train", (48, 48))
  for index in range(20):
    image = source[index].astype(np.float32)
    # A solvable puzzle needs content in every half, not a flat field.
    assert image[:24].std() > 1 and image[24:].std() > 1


def test_make_image_source_follows_the_config():
  config = data.source_config()
  config.image_size = (24, 16)
  source = data.make_image_source(config)
  assert isinstance(source, data.BundledSource) and source[5].shape == (24, 16, 3)
  config.kind = "procedural"
  config.split = "test"
  source = data.make_image_source(config)
  assert isinstance(source, data.ProceduralSource) and source.split == "test"
  np.testing.assert_array_equal(source[2], data.ProceduralSource("test", (24, 16))[2])
  # Plain dicts work too and take the defaults for missing fields.
  assert isinstance(data.make_image_source({"kind": "procedural"}), data.ProceduralSource)


def test_make_image_source_errors_list_what_is_valid():
  with pytest.raises(ValueError, match="valid fields are .*image_size"):
    data.make_image_source({"kind": "bundled", "imagesize": (8, 8)})
  with pytest.raises(ValueError, match="must be one of .*bundled.*procedural.*folder.*tfds"):
    data.make_image_source(ml_collections.ConfigDict({"kind": "coco"}))
  with pytest.raises(ValueError, match="needs config.data.source.image_size"):
    data.make_image_source({"kind": "procedural", "image_size": None})


def test_bundled_train_augmentation_flips_and_dims_train_crops_only():
  kwargs = dict(image_size=(24, 24), min_detail=8.0)
  plain = {split: data.BundledSource(split, **kwargs) for split in ("train", "test")}
  augmented = {split: data.BundledSource(split, vflip=True, min_contrast=0.25, **kwargs)
               for split in ("train", "test")}
  for index in range(40):
    # The test split is untouched, crop for crop and pixel for pixel.
    assert augmented["test"].crop_box(index) == plain["test"].crop_box(index)
    np.testing.assert_array_equal(augmented["test"][index], plain["test"][index])
  crops = [augmented["train"].chosen_crop(i)[0] for i in range(200)]
  assert 0.35 < np.mean([c.vflip for c in crops]) < 0.65
  factors = np.array([c.contrast for c in crops])
  assert factors.min() >= 0.25 and factors.max() <= 1.0 and factors.std() > 0.15
  for index in range(20):
    crop, _ = augmented["train"].chosen_crop(index)
    before, _ = plain["train"].chosen_crop(index)
    # Same boxes as without augmentation: min_detail judges the crop before its contrast changes.
    assert (crop.photo, crop.box, crop.flip) == (before.photo, before.box, before.flip)
    expected = plain["train"][index].astype(np.float32)
    if crop.vflip:
      expected = expected[::-1]
    mean = expected.mean(axis=(0, 1))
    expected = np.clip(np.round(mean + crop.contrast * (expected - mean)), 0, 255)
    np.testing.assert_allclose(augmented["train"][index], expected, atol=1)


def test_bundled_min_contrast_out_of_range_names_the_field():
  with pytest.raises(ValueError, match="min_contrast must be in"):
    data.BundledSource("train", (16, 16), min_contrast=0.0)
