"""One test per behaviour of the reference's reward code, quirks included."""

import pytest

from jigsaw_jax.puzzles.rewards import (
    extract_answer, format_reward, parse_grid, score_completion, score_connections)


def grid(completion, solution=(2, 1), m=2, n=1, think=False, **kw):
  return score_completion(completion, "grid", list(solution), think, m, n, **kw)


def letter(completion, solution="B", think=False, **kw):
  return score_completion(completion, "letter", solution, think, **kw)


# --- grids -----------------------------------------------------------------------------------

def test_grid_exact_answer():
  s = grid("2\n1")
  assert (s.accuracy, s.format, s.correct, s.total) == (1.0, 1.0, 1.0, 1.5)


def test_grid_accuracy_is_fractional_and_correct_is_exact_match():
  s = grid("1 2 3\n6 5 4", solution=(1, 2, 3, 4, 5, 6), m=2, n=3)
  assert s.accuracy == pytest.approx(4 / 6) and s.correct == 0.0 and s.format == 1.0


def test_grid_separators_backticks_commas_semicolons_newlines():
  assert parse_grid("```\n3, 1;2\n4\n```", 2, 2) == [3, 1, 2, 4]


def test_grid_single_tab_is_not_a_separator_but_two_whitespace_chars_are():
  assert parse_grid("2\t1", 2, 1) is None
  assert parse_grid("2 \t1", 2, 1) == [2, 1]
  assert parse_grid("2\r\n1", 2, 1) == [2, 1]  # "\n" -> " ", then "\r " collapses


def test_grid_out_of_range_or_non_integer_token_makes_it_unparseable():
  assert parse_grid("0 1", 2, 1) is None
  assert parse_grid("3 1", 2, 1) is None
  assert parse_grid("2. 1", 2, 1) is None
  assert parse_grid("[2, 1]", 2, 1) is None
  assert parse_grid("", 2, 1) is None
  assert parse_grid("٢ 1", 2, 1) is None  # non-ASCII digits are not digits here


def test_grid_no_permutation_check():
  s = grid("1 1", solution=(2, 1))
  assert s.format == 1.0 and s.accuracy == 0.5 and s.correct == 0.0


def test_grid_wrong_length_scores_zero_but_parses():
  s = grid("2 1 2", solution=(2, 1))
  assert (s.accuracy, s.format, s.correct) == (0.0, 0.0, 0.0)
  assert extract_answer("2 1 2", "grid", False, 3, 1) == [2, 1, 2]


def test_grid_leading_zeros_are_integers():
  assert parse_grid("02 01", 2, 1) == [2, 1]


def test_grid_non_thinking_reads_whole_output_even_with_answer_tags():
  s = grid("<answer>2 1</answer>")
  assert s.format == 0.0 and s.accuracy == 0.0


def test_connections_score():
  # 2x2 solution identity; prediction swaps the two rows: horizontal edges stay right, vertical wrong.
  assert score_connections([3, 4, 1, 2], [1, 2, 3, 4], 2, 2) == pytest.approx(0.5)
  assert score_connections([1, 2, 3, 4], [1, 2, 3, 4], 2, 2) == 1.0
  assert grid("3 4 1 2", solution=(1, 2, 3, 4), m=2, n=2, use_connections=True).accuracy == 0.5


# --- letters ---------------------------------------------------------------------------------

def test_letter_takes_the_last_capital_letter():
  assert extract_answer("A or B? I say C.", "letter", False) == "C"
  assert letter("(A) is wrong, B").correct == 1.0


def test_letter_comparison_is_case_insensitive_through_the_no_capital_fallback():
  # No ASCII capital: the extracted "answer" is the text reversed; a lone "b" still matches "B".
  assert extract_answer("b", "letter", False) == "b"
  assert extract_answer("ab c", "letter", False) == "c ba"
  assert letter("b").correct == 1.0 and letter("b").format == 0.0
  assert letter("the answer is b").correct == 0.0


def test_non_thinking_letter_format_is_the_raw_one_character_rule():
  assert letter("B").format == 1.0
  assert letter("B\n").format == 0.0 and letter("B\n").correct == 1.0  # stripped for accuracy
  assert letter(" B").format == 0.0
  assert letter("(B)").format == 0.0 and letter("(B)").correct == 1.0
  assert letter("É").format == 1.0  # str.isupper is Unicode-aware


def test_non_thinking_letter_is_read_from_the_whole_output():
  assert letter("<answer>A</answer> B").correct == 1.0


# --- thinking --------------------------------------------------------------------------------

def test_thinking_whole_string_format():
  ok = "<think>hmm</think>\n<answer>B</answer>"
  assert letter(ok, think=True).format == 1.0
  assert letter(" " + ok, think=True).format == 0.0  # nothing before
  assert letter(ok + "\n", think=True).format == 0.0  # nothing after
  assert letter("<think>a</think>b<answer>B</answer>", think=True).format == 0.0
  # The lazy match may skip an inner </think> to reach the answer block.
  assert letter("<think>a</think> x </think><answer>B</answer>", think=True).format == 1.0
  # Two answer blocks: the lazy match ends at the first, so the whole string is not matched.
  assert letter("<think>a</think><answer>A</answer><answer>B</answer>", think=True).format == 0.0


def test_thinking_reads_the_first_answer_block():
  s = letter("<think>a</think><answer>B</answer><answer>A</answer>", think=True)
  assert s.correct == 1.0


def test_thinking_letter_format_uses_the_extracted_letter():
  s = letter("<think>t</think><answer>(C) 2 is above 1</answer>", solution="C", think=True)
  assert (s.format, s.correct) == (1.0, 1.0)  # the last capital letter is C
  s = letter("<think>t</think><answer>b</answer>", think=True)
  assert (s.format, s.correct) == (0.0, 1.0)  # fallback "b": correct, but not an upper-case letter


def test_thinking_without_answer_tags_falls_back_to_the_whole_output():
  s = letter("I think it is B", think=True)
  assert (s.format, s.correct) == (0.0, 1.0)
  s = grid("<think>x</think> 2 1", think=True)
  assert s.format == 0.0 and s.accuracy == 0.0  # "<think>x</think> 2 1" is not a grid


def test_thinking_grid():
  s = grid("<think>top goes down</think> <answer>\n2\n1\n</answer>", think=True)
  assert (s.accuracy, s.format, s.correct) == (1.0, 1.0, 1.0)


def test_prefill_think_puts_the_tag_back_for_base_model_completions():
  completion = "reasoning</think><answer>B</answer>"
  assert letter(completion, think=True).format == 0.0
  assert letter(completion, think=True, prefill_think=True).format == 1.0


def test_no_capital_letter_at_all_with_empty_answer():
  s = letter("<think>t</think><answer></answer>", think=True)
  assert (s.accuracy, s.format, s.correct) == (0.0, 0.0, 0.0)


def test_format_reward_function_directly():
  assert format_reward("2 1", "grid", False, 2, 1) == 1.0
  assert format_reward("2 1", "grid", False, 1, 3) == 0.0


def test_binary_and_permutation_variants_remove_the_repeated_index_payoff():
  assert grid("2 2", solution=(2, 1)).total == 1.0  # the reference: 0.5 accuracy + 1.0 format
  assert grid("2 2", solution=(2, 1), binary_grid=True).accuracy == 0.0
  assert grid("2 2", solution=(2, 1), require_permutation=True).accuracy == 0.0
  assert grid("2 1", solution=(2, 1), binary_grid=True).accuracy == 1.0
  s = grid("1 2 3\n6 5 4", solution=(1, 2, 3, 4, 5, 6), m=2, n=3, require_permutation=True)
  assert s.accuracy == pytest.approx(4 / 6)  # a permutation keeps its fractional credit
