"""The miniature's pretraining examples teach format and visual skills, never a jigsaw answer."""

import numpy as np

from jigsaw_jax.puzzles import PuzzleSpec, make_puzzle, puzzle_rng
from jigsaw_jax.puzzles.prompts import index_grid
from jigsaw_jax.sft import pretrain


def _photo(seed, size=28):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_format_examples_pair_one_image_with_distinct_answers():
  puzzle = make_puzzle(_photo(0), PuzzleSpec(m=2, n=1), puzzle_rng(0, 0))
  rng = np.random.default_rng(0)
  for _ in range(20):
    examples = pretrain.format_examples(puzzle, rng, 2)
    assert len(examples) == 2
    (image_a, prompt_a, answer_a), (image_b, prompt_b, answer_b) = examples
    assert image_a is puzzle.image and image_b is puzzle.image
    assert prompt_a == prompt_b == puzzle.prompt
    # 2x1 has two permutations: both appear, so the image says nothing about the target.
    assert {answer_a, answer_b} == {index_grid(2, 1, [1, 2]), index_grid(2, 1, [2, 1])}


def test_format_examples_are_distinct_permutations():
  puzzle = make_puzzle(_photo(1), PuzzleSpec(m=3, n=1), puzzle_rng(0, 0))
  examples = pretrain.format_examples(puzzle, np.random.default_rng(0), 6)
  answers = {answer for _, _, answer in examples}
  assert len(examples) == 6 and len(answers) == 6  # all 3! grids, none twice
  assert len(pretrain.format_examples(puzzle, np.random.default_rng(0), 9)) == 6  # capped


def test_format_examples_of_pair_questions_are_distinct_letters_of_the_choices():
  puzzle = make_puzzle(_photo(4), PuzzleSpec(m=2, n=1, question_type="pair"), puzzle_rng(0, 3))
  letters = "ABCD"[:puzzle.num_choices]
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(30):
    examples = pretrain.format_examples(puzzle, rng, 2)
    answers = [answer for _, _, answer in examples]
    assert len(set(answers)) == 2 and set(answers) <= set(letters)
    assert all(prompt == puzzle.prompt for _, prompt, _ in examples)
    seen.update(answers)
  assert seen == set(letters)  # every letter, whichever is right, so the image predicts none


def test_splice_joins_halves_of_two_photos_or_keeps_one():
  image, other = _photo(2), _photo(3)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    out, prompt, letter = pretrain.splice_example(image, other, rng)
    assert prompt == pretrain.SPLICE_PROMPTS["paper"] and out.shape == image.shape
    if letter == "A":
      np.testing.assert_array_equal(out, image)
    else:
      assert letter == "B"
      top = np.array_equal(out[:14], image[:14]) and np.array_equal(out[14:], other[14:])
      left = np.array_equal(out[:, :14], image[:, :14]) and np.array_equal(out[:, 14:],
                                                                            other[:, 14:])
      assert top != left  # exactly one of the two joins
      seen.add("rows" if top else "columns")
    seen.add(letter)
  assert seen == {"A", "B", "rows", "columns"}
  assert image.flags.writeable  # the inputs are not modified in place
  np.testing.assert_array_equal(image, _photo(2))


def test_pretext_prompts_follow_the_puzzle_prompt_style():
  image, other = _photo(2), _photo(3)
  for style in ("paper", "compact"):
    _, splice, _ = pretrain.splice_example(image, other, np.random.default_rng(0), style)
    _, rotation, _ = pretrain.rotation_example(image, np.random.default_rng(0), style)
    for prompt, choices in ((splice, pretrain.SPLICE_CHOICES),
                            (rotation, [f"{d} degrees" for d in pretrain.ROTATIONS])):
      positions = [prompt.index(f"({letter}) {c}") for letter, c in zip("ABCD", choices)]
      assert positions == sorted(positions)
  assert len(pretrain.SPLICE_PROMPTS["compact"]) < len(pretrain.SPLICE_PROMPTS["paper"]) / 2
  assert pretrain.ROTATION_PROMPTS["compact"].endswith("Letter?")
