"""The folder source with real files, broken ones included, and its errors."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from jigsaw_jax import base_config, data
from jigsaw_jax.eval import evaluate
from jigsaw_jax.data import images

BROKEN = ("empty.jpg", "truncated.jpg", "notes.png")


def _write_valid_images(root, count=20):
  """`count` small distinct images, JPEG and PNG, some in a subfolder, as the files hold them."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    folder = os.path.join(root, "sub") if i % 3 == 0 else root
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"img_{i:02d}.{'png' if i % 2 else 'jpg'}")
    pixels = rng.integers(0, 256, size=(24 + i, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


def _write_broken_files(root):
  open(os.path.join(root, "empty.jpg"), "wb").close()
  pixels = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
  full = os.path.join(root, "full.tmp")
  Image.fromarray(pixels).save(full, format="JPEG")
  with open(full, "rb") as f:
    encoded = f.read()
  os.remove(full)
  with open(os.path.join(root, "truncated.jpg"), "wb") as f:
    f.write(encoded[:len(encoded) // 2])
  with open(os.path.join(root, "notes.png"), "w") as f:
    f.write("This is a text file with an image's name.\n")


@pytest.fixture
def folder(tmp_path):
  valid = _write_valid_images(str(tmp_path))
  _write_broken_files(str(tmp_path))
  return str(tmp_path), valid


def _data_warnings(caplog):
  return [r for r in caplog.records
          if r.name.startswith("jigsaw_jax.data") and r.levelno >= logging.WARNING]


def test_twenty_valid_and_three_broken_files_give_puzzles_from_the_twenty(folder, caplog):
  root, valid = folder
  caplog.set_level(logging.WARNING)
  config = data.default_config()
  config.source.kind = "folder"
  config.source.path = root
  config.source.image_size = None
  config.pipeline.update(prompts_per_batch=5, group_size=2, num_prompts=40)
  source = data.make_image_source(config.source)

  # Skipped, counted and reported once, in one line that names them.
  assert len(source) == 20 and source.num_skipped == 3
  assert sorted(os.path.basename(p) for p, _ in source.skipped) == sorted(BROKEN)
  assert dict((os.path.basename(p), r) for p, r in source.skipped) == {
      "empty.jpg": "zero bytes", "truncated.jpg": "truncated", "notes.png": "not an image"}
  warnings = _data_warnings(caplog)
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  print(message)  # The exact line, for the record: pytest -s shows it.
  assert "skipped 3 of 23 files" in message and "Using the other 20" in message
  assert all(name in message for name in BROKEN)

  # Two epochs of puzzles: every image of each epoch is one of the twenty, each once per epoch.
  decoded = {i: images.decode_image(p) for i, p in enumerate(source.paths)}
  assert sorted(source.paths) == sorted(valid)
  seen = []
  for batch in data.make_dataset(config, source):
    for row in range(0, len(batch["puzzle"]), 2):
      puzzle, index = batch["puzzle"][row], int(batch["image_index"][row])
      height, width = puzzle.original.shape[:2]
      np.testing.assert_array_equal(puzzle.original, decoded[index][:height, :width])
      seen.append(index)
  assert len(seen) == 40
  assert sorted(seen[:20]) == sorted(seen[20:]) == list(range(20))
  assert len(_data_warnings(caplog)) == 1  # reading reports nothing new


def test_broken_files_found_at_read_time_fall_forward_deterministically(folder, caplog):
  root, _ = folder
  caplog.set_level(logging.WARNING)
  # Headers only: zero-byte and text files are caught now, the truncated JPEG only when read.
  source = data.FolderSource(root, validate="header")
  assert len(source) == 21 and source.num_skipped == 2
  truncated = [os.path.basename(p) for p in source.paths].index("truncated.jpg")
  following = source[(truncated + 1) % len(source)]
  np.testing.assert_array_equal(source[truncated], following)
  np.testing.assert_array_equal(source[truncated], following)  # and again, without a new report
  assert source.num_skipped == 3
  late = [r.getMessage() for r in _data_warnings(caplog)][1:]
  assert len(late) == 1 and "truncated.jpg (truncated)" in late[0]


def test_file_list_restricts_and_orders_the_images(folder):
  root, valid = folder
  chosen = [os.path.relpath(valid[7], root), valid[3], "missing.jpg", "notes.png"]
  list_path = os.path.join(root, "train.json")
  with open(list_path, "w") as f:
    json.dump(chosen, f)
  source = data.make_image_source(
      {"kind": "folder", "path": root, "file_list": list_path, "image_size": (10, 12)})
  assert source.paths == [valid[7], valid[3]]
  assert sorted(r for _, r in source.skipped) == ["missing", "not an image"]
  assert source[0].shape == (10, 12, 3)
  expected = images.resize(images.decode_image(valid[7]), (10, 12))
  np.testing.assert_array_equal(source[0], expected)


def test_empty_folder_is_a_clear_error_naming_the_path(tmp_path):
  with open(os.path.join(tmp_path, "readme.txt"), "w") as f:
    f.write("no images here")
  with pytest.raises(ValueError) as error:
    data.FolderSource(str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message and "found none" in message
  assert "Point config.data.source.path at a folder" in message


def test_folder_of_only_broken_files_is_a_clear_error(tmp_path):
  _write_broken_files(str(tmp_path))
  with pytest.raises(ValueError, match=r"found 3 candidates, none readable"):
    data.FolderSource(str(tmp_path))


def test_file_list_naming_no_existing_file_is_a_clear_error(tmp_path):
  list_path = os.path.join(tmp_path, "train2014.json")
  with open(list_path, "w") as f:
    json.dump(["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"], f)
  with pytest.raises(ValueError) as error:
    data.FolderSource(str(tmp_path), file_list=list_path)
  message = str(error.value)
  assert list_path in message and "COCO_train2014_000000000009.jpg: missing" in message
  assert "relative to config.data.source.path" in message


def test_missing_folder_and_bad_file_list_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    data.FolderSource(os.path.join(tmp_path, "nope"))
  list_path = os.path.join(tmp_path, "list.json")
  with open(list_path, "w") as f:
    json.dump({"images": []}, f)
  with pytest.raises(ValueError, match="JSON list of path strings"):
    data.FolderSource(str(tmp_path), file_list=list_path)


# ---------------------------------------------------------------------------------------------
# The train and test splits: evaluation reads the test location only.
# ---------------------------------------------------------------------------------------------


def _write_split(root, count, seed):
  """`count` PNG images (lossless: a puzzle's original is an exact crop of one) of distinct
  random pixels; returns them decoded, by path."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = {}
  for i in range(count):
    path = os.path.join(root, f"{seed}_{i}.png")
    Image.fromarray(rng.integers(0, 256, size=(20 + 2 * i, 30, 3), dtype=np.uint8)).save(path)
    out[path] = images.decode_image(path)
  return out


def _eval_originals(data_cfg, num_puzzles=10):
  """The source images (cropped to the grid) of the 2x1 full eval set, made by the evaluator's own
  test-set builder."""
  eval_cfg = base_config.base_config().eval
  eval_cfg.num_puzzles = num_puzzles
  return [p.original for p in evaluate.test_puzzles(data_cfg, eval_cfg, "2x1", "full", False)]


def _which(original, pool):
  height, width = original.shape[:2]
  return [path for path, image in pool.items()
          if image.shape[0] >= height and image.shape[1] >= width
          and np.array_equal(image[:height, :width], original)]


def _folder_config(train_root, **fields):
  config = data.default_config()
  config.source.update(kind="folder", path=train_root, image_size=None, **fields)
  return config


def test_eval_puzzles_come_from_the_test_folder_and_none_from_train(tmp_path):
  train = _write_split(str(tmp_path / "train"), 6, seed=1)
  test = _write_split(str(tmp_path / "test"), 4, seed=2)
  config = _folder_config(str(tmp_path / "train"), test_path=str(tmp_path / "test"))
  originals = _eval_originals(config)
  assert len(originals) == 10
  used = set()
  for original in originals:
    assert not _which(original, train)
    (path,) = _which(original, test)
    used.add(path)
  assert used == set(test)  # 10 puzzles over 4 test images: every one of them
  # Training still reads the train folder.
  source = data.make_image_source(config.source)
  assert sorted(source.paths) == sorted(train)


def test_test_file_list_splits_one_folder_and_may_not_overlap_train(tmp_path):
  pool = _write_split(str(tmp_path / "coco"), 6, seed=3)
  names = sorted(os.path.basename(p) for p in pool)
  for split, chosen in (("train", names[:4]), ("test", names[4:])):
    with open(tmp_path / f"{split}.json", "w") as f:
      json.dump(chosen, f)
  config = _folder_config(str(tmp_path / "coco"), file_list=str(tmp_path / "train.json"),
                          test_file_list=str(tmp_path / "test.json"))
  test = {p: pool[p] for p in pool if os.path.basename(p) in names[4:]}
  assert all(_which(o, test) for o in _eval_originals(config, 4))
  # A test list that repeats a training image is refused, naming the shared file.
  with open(tmp_path / "test.json", "w") as f:
    json.dump(names[3:], f)
  with pytest.raises(ValueError,
                     match=f"shares 1 of its 3 images with the train split.*{names[3]}"):
    _eval_originals(config, 4)
  with pytest.raises(ValueError, match="shares 6 of its 6 images"):
    _eval_originals(_folder_config(str(tmp_path / "coco"), test_path=str(tmp_path / "coco")))


def test_eval_on_a_folder_without_a_test_split_is_an_error_saying_how(tmp_path):
  _write_split(str(tmp_path / "train"), 3, seed=4)
  with pytest.raises(ValueError, match=r"no test split configured.*test_hf_dataset=.*jigsaw-r1/coco"
                     r".*test_path=.*test_file_list="):
    _eval_originals(_folder_config(str(tmp_path / "train")))
  with pytest.raises(ValueError, match=r"splits \('train', 'test'\); got split='validation'"):
    data.make_image_source(dict(kind="folder", path=str(tmp_path / "train"), split="validation"))


def test_a_source_built_again_reports_its_skipped_files_once(folder, caplog):
  """A run builds the folder source for training, pretraining and every eval set."""
  root, _ = folder
  caplog.set_level(logging.WARNING)
  config = data.default_config()
  config.source.kind = "folder"
  config.source.path = root
  config.source.image_size = None
  for _ in range(3):
    assert data.make_image_source(config.source).num_skipped == 3
  assert len(_data_warnings(caplog)) == 1
