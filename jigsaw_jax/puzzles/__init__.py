"""Jigsaw puzzles: cutting, questions, prompts and rule-based rewards (numpy + PIL only)."""

from jigsaw_jax.puzzles.make import make_puzzle, puzzle_rng
from jigsaw_jax.puzzles.rewards import Score, extract_answer, format_reward, score_completion
from jigsaw_jax.puzzles.spec import Puzzle, PuzzleSpec

__all__ = [
    "Puzzle", "PuzzleSpec", "Score", "extract_answer", "format_reward", "make_puzzle",
    "puzzle_rng", "score_completion",
]
