"""The grain input pipeline: global prompt index -> image -> puzzle -> batch of GRPO groups.

Everything is index-based. The prompt with global index p gets
  - its curriculum stage and PuzzleSpec from p alone (curriculum.py),
  - its image from `image_index(p)`: position p mod len(source) of a permutation of the source
    that changes every epoch (or the identity with shuffle=False),
  - its puzzle from `make_puzzle(image, spec, puzzle_rng(seed, p))`.
So a batch is a pure function of (config, step, shard), and grain's iterator state (just the
position of the next prompt) is enough to resume exactly.

Each process reads the prompts p = shard_index, shard_index + shard_count, ...; its b-th batch holds
prompts_per_batch of them, so at every step the processes together cover one contiguous block of
global prompts and groups never straddle processes. Within a batch each puzzle is built once and
repeated group_size times in adjacent rows (rows g*G ... g*G+G-1 are the G samples of group g).
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from jigsaw_jax.data import config as config_lib
from jigsaw_jax.data import images
from jigsaw_jax.data.curriculum import Curriculum, CurriculumLike, as_curriculum
from jigsaw_jax.data.curriculum import curriculum_from_config
from jigsaw_jax.data.sources import make_image_source
from jigsaw_jax.puzzles import make_puzzle, puzzle_rng

Element = Dict[str, Any]
Batch = Dict[str, Any]

# Stream tag for the per-epoch image order, so it never coincides with a puzzle's own RNG.
_ORDER_STREAM = 0x0DE5


def image_index(prompt_index: int, num_images: int, seed: int, shuffle: bool) -> int:
  """The source index of the image for global prompt `prompt_index`.

  Epoch e = p // num_images visits every image once, in the order of grain's `index_shuffle`
  permutation seeded by (seed, e): a pure function, O(1) per call, no state to save.
  """
  epoch, position = divmod(int(prompt_index), int(num_images))
  if not shuffle or num_images == 1:
    return position
  epoch_seed = int(np.random.SeedSequence([int(seed), _ORDER_STREAM, epoch]).generate_state(1)[0])
  return int(grain.experimental.index_shuffle(
      position, max_index=num_images - 1, seed=epoch_seed, rounds=4))


@dataclasses.dataclass(frozen=True)
class PuzzleMaker:
  """Builds the element of one global prompt index (picklable, for grain worker processes).

  The element holds `image` (the shuffled composite, resized when resize_to is set), `prompt`
  (the user-turn text), `puzzle` (the full `Puzzle`, for rewards and logging), and the ints
  `prompt_index`, `image_index`, `stage`, `m`, `n`. `record_transform` may add fields (e.g. token
  ids); it runs once per puzzle, before the group copies.
  """

  source: images.ImageSource
  curriculum: Curriculum
  seed: int
  shuffle: bool
  resize_to: Optional[images.ImageSize]
  record_transform: Optional[Callable[[Element], Element]] = None

  def __call__(self, prompt_index: int) -> Element:
    prompt_index = int(prompt_index)
    stage = self.curriculum.stage_index(prompt_index)
    index = image_index(prompt_index, len(self.source), self.seed, self.shuffle)
    puzzle = make_puzzle(self.source[index], self.curriculum.stages[stage].spec,
                         puzzle_rng(self.seed, prompt_index))
    element = {
        "image": images.resize(puzzle.image, self.resize_to),
        "prompt": puzzle.prompt,
        "puzzle": puzzle,
        "prompt_index": prompt_index,
        "image_index": index,
        "stage": stage,
        "m": puzzle.m,
        "n": puzzle.n,
    }
    if self.record_transform is not None:
      element = self.record_transform(element)
    return element


def _collate_values(values: List[Any]) -> Any:
  """Stacks what stacks (equal-shape arrays, numbers), keeps everything else as a list."""
  first = values[0]
  if isinstance(first, np.ndarray):
    if all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
           for v in values):
      return np.stack(values)
    return list(values)
  if all(isinstance(v, (bool, np.bool_)) for v in values):
    return np.asarray(values, dtype=bool)
  if all(isinstance(v, numbers.Integral) for v in values):
    return np.asarray(values, dtype=np.int64)
  if all(isinstance(v, numbers.Real) for v in values):
    return np.asarray(values, dtype=np.float32)
  return list(values)


def collate_groups(elements: Sequence[Element], group_size: int, stack_images: bool) -> Batch:
  """One batch: each element repeated `group_size` times in adjacent rows.

  `image` is an array [rows, H, W, 3] when `stack_images` (all resized to one size) and otherwise
  a list, so its type depends on the config and never on the data. The G rows of a group share
  the same objects (no copies of lists' items): treat batches as read-only.
  """
  rows = [element for element in elements for _ in range(group_size)]
  batch = {}
  for key in rows[0]:
    values = [row[key] for row in rows]
    if key == "image":
      batch[key] = np.stack(values) if stack_images else values
    else:
      batch[key] = _collate_values(values)
  return batch


@dataclasses.dataclass(frozen=True)
class BatchMaker:
  """Builds the batch of a list of prompt indices: each puzzle once, then G adjacent copies."""

  maker: PuzzleMaker
  group_size: int
  stack_images: bool

  def __call__(self, prompt_indices: Sequence[int]) -> Batch:
    return collate_groups([self.maker(p) for p in prompt_indices], self.group_size,
                          self.stack_images)


def make_dataset(
    config: ml_collections.ConfigDict,
    source: Optional[images.ImageSource] = None,
    *,
    curriculum: Optional[CurriculumLike] = None,
    shard_index: int = 0,
    shard_count: int = 1,
    record_transform: Optional[Callable[[Element], Element]] = None,
    batch_transform: Optional[Callable[[Batch], Batch]] = None,
) -> grain.IterDataset:
  """The batches of one process as a grain IterDataset.

  `it = iter(dataset)` yields dicts with prompts_per_batch * group_size rows, a group's G copies
  adjacent:
    image:        uint8 [rows, H, W, 3] with pipeline.resize_to, else a list of [H_i, W_i, 3].
    prompt:       list of the user-turn texts.
    puzzle:       list of `Puzzle` (solution, m, n, question type... for the rewards).
    prompt_index, image_index, stage, m, n: int64 [rows].
    ...plus whatever record_transform / batch_transform add.
  `it.get_state()` is a small JSON-serialisable dict, and `iter(make_dataset(same config))` given
  `.set_state(state)` yields exactly the batches the first iterator would have yielded next
  (restore with the same worker_count: worker processes keep a different state).

  Args:
    config: `config.data` (fields `source` and `pipeline`; see jigsaw_jax.data.config).
    source: an image source to use instead of `make_image_source(config.source)`.
    curriculum: a Curriculum, PuzzleSpec, or [(start_prompt, PuzzleSpec), ...] to use instead of
      `config.pipeline.puzzle` and `config.pipeline.curriculum`.
    shard_index: this process (jax.process_index()).
    shard_count: the number of processes (jax.process_count()).
    record_transform: runs once per puzzle on its element dict (tokenisation hooks in here).
    batch_transform: runs on every batch dict.
  """
  p = config_lib.merged_fields(config.pipeline, config_lib.pipeline_config(),
                               "config.data.pipeline")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); got {shard_index}.")
  for key in ("prompts_per_batch", "group_size"):
    if int(p[key]) < 1:
      raise ValueError(f"config.data.pipeline.{key} must be at least 1; got {p[key]}.")
  if source is None:
    source = make_image_source(config.source)
  if curriculum is None:
    curriculum = curriculum_from_config(
        p["puzzle"], p["curriculum"], prompts_per_step=p["prompts_per_batch"] * shard_count)
  resize_to = images.check_image_size(p["resize_to"], "pipeline",
                                     field="config.data.pipeline.resize_to")

  maker = PuzzleMaker(source=source, curriculum=as_curriculum(curriculum), seed=int(p["seed"]),
                      shuffle=bool(p["shuffle"]), resize_to=resize_to,
                      record_transform=record_transform)
  num_prompts = sys.maxsize if p["num_prompts"] is None else int(p["num_prompts"])
  # Batches of prompt indices first, puzzles second: a worker (thread or process) then builds a
  # whole batch, and grain hands batches out to workers and back in order, so batch b always
  # holds this shard's prompts b*B ... b*B+B-1 however many workers there are.
  prompt_batches = grain.MapDataset.range(num_prompts)[shard_index::shard_count].batch(
      int(p["prompts_per_batch"]), drop_remainder=bool(p["drop_remainder"]), batch_fn=list)
  dataset = prompt_batches.map(BatchMaker(maker, int(p["group_size"]), resize_to is not None))
  if batch_transform is not None:
    dataset = dataset.map(batch_transform)
  iterable = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=int(p["read_threads"]), prefetch_buffer_size=int(p["prefetch_buffer_size"])))
  if int(p["worker_count"]) > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside an absl app (notebooks, tests) use defaults.
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(p["worker_count"])))
  return iterable
