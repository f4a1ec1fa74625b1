"""From a batch of puzzles to rewards: tokenise prompts, decode completions, score them.

Host-side numpy glue between the grain pipeline (puzzles repeated G times), the sampler (token
ids) and the rule-based rewards (strings), shared by GRPO, evaluation and Proxy-RLHF.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from jigsaw_jax.models.processing import Processor, PromptBatch, collate
from jigsaw_jax.puzzles import Puzzle, score_completion


def encode_record(processor: Processor):
  """A record_transform for the grain pipeline: tokenises each puzzle once (before its G copies)."""
  def transform(element: Dict[str, Any]) -> Dict[str, Any]:
    puzzle = element["puzzle"]
    element["encoded"] = processor.encode_prompt(puzzle.prompt, puzzle.image)
    return element
  return transform


def unique_encoded(batch: Dict[str, Any], group_size: int,
                   processor: Processor) -> tuple[list, List[Puzzle]]:
  """The distinct prompts of a batch (one per group), encoded, not collated; and their puzzles."""
  puzzles = list(batch["puzzle"][::group_size])
  encoded = [e for e in batch["encoded"][::group_size]] if "encoded" in batch else [
      processor.encode_prompt(p.prompt, p.image) for p in puzzles]
  return encoded, puzzles


def unique_prompts(batch: Dict[str, Any], group_size: int, processor: Processor,
                   bucket: int) -> tuple[PromptBatch, List[Puzzle]]:
  """The distinct prompts of a batch (one per group), collated and left-padded to a bucket."""
  encoded, puzzles = unique_encoded(batch, group_size, processor)
  return collate(encoded, processor.pad_token_id, bucket), puzzles


def decode_completions(processor: Processor, tokens: np.ndarray, mask: np.ndarray) -> List[str]:
  """Completion texts with special tokens skipped, as the reference decodes them."""
  tokens = np.asarray(tokens)
  mask = np.asarray(mask).astype(bool)
  return processor.tokenizer.batch_decode([row[m].tolist() for row, m in zip(tokens, mask)],
                                          skip_special_tokens=True)


def reward_options(config) -> Dict[str, bool]:
  """`config.reward` as keyword arguments of `score_texts`."""
  r = config.reward
  return dict(use_connections=bool(r.connections), binary_grid=bool(r.binary_grid),
              require_permutation=bool(r.require_permutation))


def score_texts(puzzles: Sequence[Puzzle], texts: Sequence[str], group_size: int,
                use_connections: bool = False, binary_grid: bool = False,
                require_permutation: bool = False) -> Dict[str, np.ndarray]:
  """Rewards of G completions per puzzle: arrays [num_puzzles, G] of accuracy, format, correct and
  total (1.0 * accuracy + 0.5 * format). Base-model prompts end inside <think>, so their
  completions are scored with the tag put back, as the reference does."""
  if len(texts) != len(puzzles) * group_size:
    raise ValueError(f"{len(texts)} completions for {len(puzzles)} puzzles x G={group_size}.")
  fields = {k: np.zeros((len(puzzles), group_size), np.float32)
            for k in ("accuracy", "format", "correct", "total")}
  for i, puzzle in enumerate(puzzles):
    for g in range(group_size):
      s = score_completion(texts[i * group_size + g], puzzle.answer_type, puzzle.solution,
                           puzzle.think, puzzle.m, puzzle.n,
                           prefill_think=puzzle.think and not puzzle.instruct_model,
                           use_connections=use_connections, binary_grid=binary_grid,
                           require_permutation=require_permutation)
      fields["accuracy"][i, g], fields["format"][i, g] = s.accuracy, s.format
      fields["correct"][i, g], fields["total"][i, g] = s.correct, s.total
  return fields
