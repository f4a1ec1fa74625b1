"""Properties of cutting and shuffling, for every grid up to 6x6 and any image that fits it."""

import numpy as np
from hypothesis import given, settings, strategies as st

from jigsaw_jax.puzzles import PuzzleSpec, cut, make_puzzle, puzzle_rng
from jigsaw_jax.puzzles.questions import relation_choices, true_relation


@st.composite
def grid_and_image(draw):
  m = draw(st.integers(1, 6))
  n = draw(st.integers(1 if m > 1 else 2, 6))
  height = draw(st.integers(max(m, n), 40))
  width = draw(st.integers(max(m, n), 40))
  seed = draw(st.integers(0, 2**31 - 1))
  image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return m, n, image, seed


@settings(max_examples=150, deadline=None)
@given(grid_and_image(), st.sampled_from(["full", "pair"]), st.booleans())
def test_reassembling_by_labels_gives_back_the_cropped_original(case, question_type, shuffle_mn):
  m, n, image, seed = case
  spec = PuzzleSpec(m=m, n=n, question_type=question_type, shuffle_mn=shuffle_mn)
  puzzle = make_puzzle(image, spec, puzzle_rng(seed, 0))
  assert {(puzzle.m, puzzle.n)} <= {(m, n), (n, m)}
  if not shuffle_mn:
    assert (puzzle.m, puzzle.n) == (m, n)
  # Crop keeps the top-left corner and divides exactly.
  height, width = puzzle.original.shape[:2]
  assert height % puzzle.m == 0 and width % puzzle.n == 0
  np.testing.assert_array_equal(puzzle.original, image[:height, :width])
  assert height > image.shape[0] - puzzle.m and width > image.shape[1] - puzzle.n
  # Same size composite, a permutation of 1..mn as labels, exact reassembly.
  assert puzzle.image.shape == puzzle.original.shape
  assert sorted(puzzle.permutation) == list(range(1, puzzle.m * puzzle.n + 1))
  np.testing.assert_array_equal(
      cut.reassemble(puzzle.image, puzzle.m, puzzle.n, puzzle.permutation), puzzle.original)


@settings(max_examples=150, deadline=None)
@given(grid_and_image())
def test_pair_answer_agrees_with_the_permutation(case):
  m, n, image, seed = case
  puzzle = make_puzzle(image, PuzzleSpec(m=m, n=n, question_type="pair"), puzzle_rng(seed, 1))
  k, l = puzzle.pair
  assert k != l and 1 <= k <= puzzle.m * puzzle.n and 1 <= l <= puzzle.m * puzzle.n
  assert puzzle.num_choices == (2 if 1 in (puzzle.m, puzzle.n) else 8)
  # Independent check from geometry: where did the patches now at k and l come from?
  k_row, k_col = divmod(puzzle.permutation[k - 1] - 1, puzzle.n)
  l_row, l_col = divmod(puzzle.permutation[l - 1] - 1, puzzle.n)
  vertical = "" if k_row == l_row else ("upper" if k_row < l_row else "lower")
  horizontal = "" if k_col == l_col else ("left" if k_col < l_col else "right")
  expected = {
      ("", "left"): "is directly to the left of", ("", "right"): "is directly to the right of",
      ("upper", ""): "is directly above", ("lower", ""): "is directly below",
  }.get((vertical, horizontal), f"is on the {vertical} {horizontal} of")
  answer = puzzle.choices["ABCDEFGH".index(puzzle.solution)]
  assert answer == f"{k} {expected} {l}"
  assert len(set(puzzle.choices)) == puzzle.num_choices
  assert set(c.split(" ", 1)[1].rsplit(" ", 1)[0] for c in puzzle.choices) == set(
      relation_choices(puzzle.m, puzzle.n))


def test_relation_is_not_adjacency():
  # 1x3: cell 1 is "directly to the left of" cell 3 although they are not neighbours.
  assert true_relation(3, 1, 3) == "is directly to the left of"
  assert true_relation(3, 3, 1) == "is directly to the right of"


def test_answer_letter_is_uniform():
  image = np.zeros((8, 8, 3), np.uint8)
  spec = PuzzleSpec(m=2, n=2, question_type="pair", shuffle_mn=False)
  letters = [make_puzzle(image, spec, puzzle_rng(0, i)).solution for i in range(4000)]
  counts = np.array([letters.count(c) for c in "ABCDEFGH"])
  assert counts.sum() == 4000
  assert np.all(np.abs(counts - 500) < 5 * np.sqrt(500)), counts  # 5 sigma


def test_orientation_swap_is_about_half():
  image = np.zeros((8, 8, 3), np.uint8)
  spec = PuzzleSpec(m=2, n=1)
  sizes = [make_puzzle(image, spec, puzzle_rng(3, i)).size for i in range(2000)]
  assert set(sizes) == {"2x1", "1x2"}
  assert abs(sizes.count("1x2") - 1000) < 5 * np.sqrt(500)


def test_a_puzzle_is_a_pure_function_of_seed_and_index():
  image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
  spec = PuzzleSpec(m=3, n=2, question_type="pair")
  state = np.random.get_state()
  a = make_puzzle(image, spec, puzzle_rng(7, 11))
  b = make_puzzle(image, spec, puzzle_rng(7, 11))
  c = make_puzzle(image, spec, puzzle_rng(7, 12))
  assert a.prompt == b.prompt and a.permutation == b.permutation and a.solution == b.solution
  np.testing.assert_array_equal(a.image, b.image)
  assert (a.prompt, a.permutation) != (c.prompt, c.permutation)
  # No global RNG touched.
  assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
             for x, y in zip(state, np.random.get_state()))


def test_mask_blacks_out_borders_like_the_reference():
  image = np.full((20, 20, 3), 255, np.uint8)
  masked = cut.mask_borders(image, 2, 2, 0.2)  # patch 10 px, outer band 2, inner half-bands 1
  row_black = np.all(masked == 0, axis=(1, 2))
  assert list(np.nonzero(row_black)[0]) == [0, 1, 9, 10, 18, 19]
  assert masked[5, 5].tolist() == [255, 255, 255]


def test_too_small_an_image_is_a_clear_error():
  import pytest
  with pytest.raises(ValueError, match="cannot be cut into 3x3"):
    make_puzzle(np.zeros((2, 10, 3), np.uint8), PuzzleSpec(m=3, n=3, shuffle_mn=False),
                puzzle_rng(0, 0))
