"""The grain pipeline: determinism, GRPO groups, curriculum, sharding and exact resume."""

import json
import random

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from jigsaw_jax import data
from jigsaw_jax.data import curriculum as curriculum_lib
from jigsaw_jax.puzzles import PuzzleSpec


class ListSource:
  """A finite in-memory source, so epochs wrap within a test."""

  def __init__(self, count=5):
    rng = np.random.default_rng(7)
    self.images = [rng.integers(0, 256, size=(12 + i, 16, 3), dtype=np.uint8)
                   for i in range(count)]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return self.images[index]


def _config(**pipeline):
  config = data.default_config()
  config.source.kind = "procedural"
  config.source.image_size = (24, 24)
  config.pipeline.update(prompts_per_batch=3, group_size=4)
  config.pipeline.update(pipeline)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    a, b = first[key], second[key]
    if isinstance(a, np.ndarray):
      np.testing.assert_array_equal(a, b, err_msg=key)
    elif key == "puzzle":
      assert [p.to_record() for p in a] == [p.to_record() for p in b]
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.original, y.original)
    elif key == "image":
      assert len(a) == len(b)
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    else:
      assert a == b, key


def test_the_same_config_gives_the_same_batches_whatever_the_threads():
  before = (random.getstate(), np.random.get_state()[1].copy())
  reference = _take(iter(data.make_dataset(_config(read_threads=0))), 4)
  for threads in (1, 3):
    for got, want in zip(_take(iter(data.make_dataset(_config(read_threads=threads))), 4),
                         reference):
      _assert_batches_equal(got, want)
  assert random.getstate() == before[0]  # no global RNG touched
  np.testing.assert_array_equal(np.random.get_state()[1], before[1])


def test_a_different_seed_gives_different_puzzles():
  first = next(iter(data.make_dataset(_config())))
  second = next(iter(data.make_dataset(_config(seed=1))))
  assert any(not np.array_equal(a, b) for a, b in zip(first["image"], second["image"]))


def test_each_puzzle_is_repeated_group_size_times_adjacently():
  group_size, prompts = 4, 3
  batches = _take(iter(data.make_dataset(_config())), 3)
  for step, batch in enumerate(batches):
    assert len(batch["prompt"]) == len(batch["puzzle"]) == prompts * group_size
    expected = np.repeat(np.arange(step * prompts, (step + 1) * prompts), group_size)
    np.testing.assert_array_equal(batch["prompt_index"], expected)
    for group in range(prompts):
      rows = range(group * group_size, (group + 1) * group_size)
      first = batch["puzzle"][rows[0]]
      for row in rows:
        assert batch["puzzle"][row].to_record() == first.to_record()
        np.testing.assert_array_equal(batch["image"][row], first.image)
        assert batch["prompt"][row] == first.prompt
    # Neighbouring groups are different puzzles.
    assert len({p.image.tobytes() for p in batch["puzzle"]}) == prompts


def test_resize_to_stacks_the_images_into_one_array():
  config = _config(resize_to=(28, 20))
  config.pipeline.puzzle.update(m=3, n=2)  # crops to the grid differ with the m/n swap
  batch = next(iter(data.make_dataset(config)))
  assert isinstance(batch["image"], np.ndarray)
  assert batch["image"].shape == (12, 28, 20, 3) and batch["image"].dtype == np.uint8
  unresized = next(iter(data.make_dataset(_config())))
  assert isinstance(unresized["image"], list)


def test_curriculum_switches_stage_at_the_configured_prompts():
  config = _config()
  config.pipeline.puzzle.update(m=2, n=1, shuffle_mn=False)
  config.pipeline.curriculum = [{"start_step": 2, "m": 3},
                                {"start_prompt": 15, "question_type": "pair"}]
  batches = _take(iter(data.make_dataset(config)), 7)
  for batch in batches:
    for row, prompt_index in enumerate(batch["prompt_index"]):
      puzzle = batch["puzzle"][row]
      stage = 0 if prompt_index < 6 else 1 if prompt_index < 15 else 2
      assert batch["stage"][row] == stage
      assert (puzzle.m, puzzle.n) == ((2, 1) if stage == 0 else (3, 1))
      assert puzzle.question_type == ("pair" if stage == 2 else "full")


def test_curriculum_from_python_specs_and_its_errors():
  spec_a, spec_b = PuzzleSpec(m=2, n=1), PuzzleSpec(m=2, n=2, question_type="pair")
  curriculum = curriculum_lib.as_curriculum([(0, spec_a), (10, spec_b)])
  assert [curriculum.spec(p) for p in (0, 9, 10, 10**12)] == [spec_a, spec_a, spec_b, spec_b]
  with pytest.raises(ValueError, match="must start at prompt 0"):
    curriculum_lib.as_curriculum([(5, spec_a)])
  with pytest.raises(ValueError, match="exactly one of"):
    curriculum_lib.curriculum_from_config({}, [{"m": 3}], prompts_per_step=4)
  with pytest.raises(ValueError, match="unknown fields"):
    curriculum_lib.curriculum_from_config({}, [{"start_step": 1, "rows": 3}], prompts_per_step=4)
  with pytest.raises(ValueError, match="increasing order"):
    curriculum_lib.curriculum_from_config(
        {}, [{"start_step": 2, "m": 3}, {"start_step": 1, "m": 4}], prompts_per_step=4)


def test_restored_iterator_yields_exactly_the_next_batches():
  config = _config(num_prompts=None)
  config.pipeline.curriculum = [{"start_step": 4, "m": 3}]  # a stage switch after the restore
  uninterrupted = iter(data.make_dataset(config))
  _take(uninterrupted, 3)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # as a checkpoint would store it
  expected = _take(uninterrupted, 3)

  restored = iter(data.make_dataset(config))
  restored.set_state(state)
  for got, want in zip(_take(restored, 3), expected):
    _assert_batches_equal(got, want)


def test_restore_across_epochs_of_a_finite_source():
  config = _config(prompts_per_batch=2, group_size=2, num_prompts=16)
  uninterrupted = list(data.make_dataset(config, ListSource()))
  assert len(uninterrupted) == 8
  iterator = iter(data.make_dataset(config, ListSource()))
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  restored = iter(data.make_dataset(config, ListSource()))
  restored.set_state(state)
  rest = list(restored)
  assert len(rest) == 5
  for got, want in zip(rest, uninterrupted[3:]):
    _assert_batches_equal(got, want)


def test_finite_source_visits_every_image_once_per_epoch_in_a_new_order():
  config = _config(prompts_per_batch=5, group_size=1, num_prompts=15)
  batches = list(data.make_dataset(config, ListSource(5)))
  epochs = [list(b["image_index"]) for b in batches]
  assert all(sorted(epoch) == [0, 1, 2, 3, 4] for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) > 1
  config.pipeline.shuffle = False
  in_order = list(data.make_dataset(config, ListSource(5)))
  assert all(list(b["image_index"]) == [0, 1, 2, 3, 4] for b in in_order)


@hypothesis.given(num_images=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
                  epoch=st.integers(0, 1000))
@hypothesis.settings(max_examples=50, deadline=None)
def test_image_index_is_a_permutation_within_every_epoch(num_images, seed, epoch):
  indices = [data.image_index(epoch * num_images + i, num_images, seed, True)
             for i in range(num_images)]
  assert sorted(indices) == list(range(num_images))


def test_partial_last_batch_is_kept_without_drop_remainder():
  config = _config(prompts_per_batch=4, group_size=2, num_prompts=10, drop_remainder=False)
  sizes = [len(b["prompt"]) for b in data.make_dataset(config, ListSource())]
  assert sizes == [8, 8, 4]
  config.pipeline.drop_remainder = True
  assert [len(b["prompt"]) for b in data.make_dataset(config, ListSource())] == [8, 8]


def test_shards_together_cover_each_global_step_with_whole_groups():
  global_config = _config(prompts_per_batch=4, group_size=2)
  global_config.pipeline.curriculum = [{"start_step": 1, "m": 3}]
  shard_config = _config(prompts_per_batch=2, group_size=2)
  shard_config.pipeline.curriculum = [{"start_step": 1, "m": 3}]  # steps of the global batch
  global_batches = _take(iter(data.make_dataset(global_config)), 3)
  shards = [_take(iter(data.make_dataset(shard_config, shard_index=k, shard_count=2)), 3)
            for k in range(2)]
  for step, global_batch in enumerate(global_batches):
    want = {int(p): puzzle for p, puzzle in zip(global_batch["prompt_index"],
                                               global_batch["puzzle"])}
    got = {}
    for shard in shards:
      batch = shard[step]
      groups = batch["prompt_index"].reshape(-1, 2)
      assert (groups == groups[:, :1]).all()  # groups stay whole on one process
      got.update({int(p): puzzle for p, puzzle in zip(batch["prompt_index"], batch["puzzle"])})
    assert sorted(got) == list(range(4 * step, 4 * step + 4))
    for p, puzzle in got.items():
      assert puzzle.to_record() == want[p].to_record()
      np.testing.assert_array_equal(puzzle.image, want[p].image)


def test_record_transform_runs_once_per_puzzle_and_its_fields_are_batched():
  calls = []

  def add_length(element):
    calls.append(element["prompt_index"])
    return {**element, "prompt_length": np.array([len(element["prompt"])], np.int32)}

  config = _config(prompts_per_batch=3, group_size=4, num_prompts=6)
  batches = list(data.make_dataset(
      config, record_transform=add_length,
      batch_transform=lambda batch: {**batch, "rows": len(batch["prompt"])}))
  assert sorted(calls) == list(range(6))
  assert batches[0]["prompt_length"].shape == (12, 1) and batches[0]["rows"] == 12
  assert batches[0]["prompt_length"][0, 0] == len(batches[0]["prompt"][0])


def test_pipeline_config_errors_list_the_valid_fields():
  config = _config()
  config.pipeline.unlock()
  config.pipeline.group = 8
  with pytest.raises(ValueError, match="valid fields are .*group_size"):
    data.make_dataset(config)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_dataset(_config(), shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_batches_and_restore_exactly():
  config = _config(prompts_per_batch=2, group_size=2, read_threads=0)
  reference = _take(iter(data.make_dataset(config)), 4)
  config.pipeline.worker_count = 2
  iterator = iter(data.make_dataset(config))
  got = _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  got += _take(iterator, 2)
  for a, b in zip(got, reference):
    _assert_batches_equal(a, b)
  restored = iter(data.make_dataset(config))
  restored.set_state(state)
  for a, b in zip(_take(restored, 2), reference[2:]):
    _assert_batches_equal(a, b)
