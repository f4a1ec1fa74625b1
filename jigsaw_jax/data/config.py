"""The data section of an experiment config: where images come from and how batches are made.

Experiment configs (configs/*.py) start from `default_config()` and override fields, e.g.

  config.data = data.default_config()
  config.data.source.kind = "folder"
  config.data.source.path = "/data/coco/train2014"
  config.data.source.file_list = "/data/coco/train2014.json"

or on the command line: `--config.data.source.kind=procedural --config.data.pipeline.group_size=4`.

`config.data.source` (see `make_image_source`):
  kind:           "bundled" (default) | "procedural" | "folder" | "tfds".
  split:          "train" | "test" for bundled and procedural (disjoint; see bundled.py) and for
                  folder (train: path/file_list; test: the test_* fields below); any tfds split
                  for tfds ("train", "validation", "train[:10%]"). Evaluation reads "test".
  seed:           bundled and procedural: with (split, index) the only input to an image.
  image_size:     (height, width) of every image. Required by bundled and procedural; for folder
                  and tfds None keeps native sizes (the reference feeds COCO at native size).
  bundled only:
    min_scale:      smallest crop side as a fraction of the largest crop that fits (0, 1].
    test_fraction:  share of each photo's longer side reserved for the test split.
    hflip:          flip half of the crops left-right.
    photos:         names of the photos to use in both splits (None: the twelve colour photos;
                    see bundled.PHOTO_NAMES).
    train_photos:   more photos for the train split only, cropped anywhere in them; the test
                    split never draws them (default none).
    min_detail:     redraw crops flatter than this mean neighbour difference (0: keep all).
    same_scale:     crop both splits at one distribution of pixel scale (see BundledSource).
    vflip:          flip half of the train crops upside down (never the test split).
    min_contrast:   lower each train crop's contrast by a factor in [min_contrast, 1] (1.0: off;
                    never the test split).
  folder only:
    path:           the folder, searched recursively for extensions.
    file_list:      optional JSON list of paths (relative to path, or absolute), like the
                    reference's train2014.json; restricts and orders the images.
    validate:       "full" (decode every file at start, ~1 ms/image/thread) | "header" | "none".
    extensions:     file name endings picked up by the search.
    The test split (evaluation), one of these; none set is an error when evaluating:
    test_hf_dataset: a local export of the reference's test set (Hugging Face dataset
                    jigsaw-r1/coco, split test): a save_to_disk directory or parquet files
                    (data/hf_dataset.py); read with the `datasets` library, images in `image_key`.
    test_hf_split:  the split of test_hf_dataset to read ("test").
    test_path:      a folder of test images (e.g. a COCO test2014 subset), searched like path.
    test_file_list: a JSON list of test image paths (relative to test_path, else to path). The
                    test split may share no file with the train split.
  tfds only:
    name:           e.g. "coco/2017"; prepared with --file_format=array_record.
    data_dir:       where prepared datasets live (None: tfds' default).
    image_key:      the feature holding the image (also the column of test_hf_dataset).

`config.data.pipeline` (see `make_dataset`):
  seed:              the puzzle of prompt p is a pure function of (seed, p, stage).
  prompts_per_batch: distinct puzzles in one batch of this process; a batch has
                     prompts_per_batch * group_size rows. The global batch is this times the
                     number of processes (shard_count).
  group_size:        G, the adjacent identical copies of each puzzle (GRPO group).
  num_prompts:       None for an endless stream (training); a count for a finite set (evaluation).
  shuffle:           for finite sources, visit images in a new order every epoch (else in order).
  drop_remainder:    drop a final partial batch (only matters with num_prompts).
  resize_to:         None: `batch["image"]` is a list (puzzles differ in size after cropping to the
                     grid); (height, width): every puzzle image is resized to it and stacked.
  read_threads:      in-process threads that build batches ahead of the consumer (0: build
                     each batch when asked for it).
  prefetch_buffer_size: batches built ahead.
  worker_count:      > 0 builds batches in that many processes instead (grain mp_prefetch); the
                     batches and their order do not change.
  puzzle:            the PuzzleSpec fields of the first stage (m, n, question_type, think,
                     shuffle_mn, mask_ratio, instruct_model, prompt_style).
  curriculum:        later stages: a list of dicts, each with `start_step` (optimizer steps of the
                     global batch) or `start_prompt` (global prompt index), plus the PuzzleSpec
                     fields that change from the stage before, e.g.
                     [{"start_step": 1000, "m": 4}] is the paper's 3x1 -> 4x1 curriculum when
                     puzzle.m = 3.
"""

from __future__ import annotations

import ml_collections


def source_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data.source` (every field is documented in the module docstring)."""
  return ml_collections.ConfigDict({
      "kind": "bundled",
      "split": "train",
      "seed": 0,
      "image_size": ml_collections.FieldReference((112, 112), field_type=tuple),
      # bundled
      "min_scale": 0.35,
      "test_fraction": 0.2,
      "hflip": True,
      "photos": ml_collections.FieldReference(None, field_type=tuple),
      "train_photos": (),
      "min_detail": 0.0,
      "same_scale": False,
      "vflip": False,
      "min_contrast": 1.0,
      # folder
      "path": "",
      "file_list": "",
      "validate": "full",
      "extensions": (".jpg", ".jpeg", ".png"),
      "test_path": "",
      "test_file_list": "",
      "test_hf_dataset": "",
      "test_hf_split": "test",
      # tfds
      "name": "",
      "data_dir": "",
      "image_key": "image",
  })


def puzzle_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data.pipeline.puzzle`: the fields of `PuzzleSpec`."""
  return ml_collections.ConfigDict({
      "m": 2,
      "n": 1,
      "question_type": "full",
      "think": False,
      "shuffle_mn": True,
      "mask_ratio": 0.0,
      "instruct_model": True,
      "prompt_style": "paper",
  })


def pipeline_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data.pipeline` (every field is documented in the module docstring)."""
  return ml_collections.ConfigDict({
      "seed": 0,
      "prompts_per_batch": 4,
      "group_size": 8,
      "num_prompts": ml_collections.FieldReference(None, field_type=int),
      "shuffle": True,
      "drop_remainder": True,
      "resize_to": ml_collections.FieldReference(None, field_type=tuple),
      "read_threads": 1,
      "prefetch_buffer_size": 2,
      "worker_count": 0,
      "puzzle": puzzle_config(),
      "curriculum": [],
  })


def default_config() -> ml_collections.ConfigDict:
  """`config.data`: the bundled photos, 2x1 full puzzles, 4 prompts x G=8 per batch."""
  return ml_collections.ConfigDict({"source": source_config(), "pipeline": pipeline_config()})


def merged_fields(config, defaults: ml_collections.ConfigDict, where: str) -> dict:
  """`config` (ConfigDict or mapping) over `defaults` as a plain dict.

  A key that the defaults lack is an error that lists the valid keys, so a misspelt knob never
  passes silently.
  """
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  fields = defaults.to_dict()
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f"Unknown {where} fields {unknown}; the valid fields are {sorted(fields)}.")
  fields.update(given)
  return fields
