"""DAPO's dynamic sampling: train only on groups whose G rewards differ.

A group whose G completions all earn the same reward has advantage 0 everywhere: it adds nothing
to the policy gradient but its KL term, and it dilutes the batch. With `config.rl.dynamic_sampling`
the trainer keeps drawing batches of puzzles (a new rollout each) until it holds
`prompts_per_batch` groups with a learning signal, at most `config.rl.max_draws` draws per step;
if the cap is reached, zero-variance groups fill the rest so that the update keeps its fixed,
compiled shape (Yu et al. 2025, "DAPO", §3.2; verl caps the draws the same way).

`Groups` is the host-side record of one draw; `pick_groups` chooses the groups of the update
(`fill_batch` takes them; their prompts are rows of the draws' collated prompts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from jigsaw_jax.rl.grpo import advantages as advantages_lib


@dataclasses.dataclass(frozen=True)
class Groups:
  """Rollouts of P prompts, G completions each: rows g*G ... g*G+G-1 belong to prompt g."""

  encoded: List[Any]  # P PromptInputs (token ids and pixels of each prompt)
  puzzles: List[Any]  # P Puzzle
  tokens: np.ndarray  # int [P*G, T] completion tokens
  mask: np.ndarray  # [P*G, T] 1 on generated tokens
  texts: List[str]  # P*G decoded completions
  scores: Dict[str, np.ndarray]  # each [P, G]: accuracy, format, correct, total
  rewards: np.ndarray  # float [P, G]: the reward the advantages are computed from

  @property
  def group_size(self) -> int:
    return int(self.rewards.shape[1])

  def __len__(self) -> int:
    return len(self.puzzles)

  def take(self, groups: Sequence[int]) -> "Groups":
    """The listed groups (prompt indices), in that order."""
    groups = np.asarray(groups, np.int64)
    rows = (groups[:, None] * self.group_size + np.arange(self.group_size)[None]).reshape(-1)
    return Groups(
        encoded=[self.encoded[g] for g in groups], puzzles=[self.puzzles[g] for g in groups],
        tokens=self.tokens[rows], mask=self.mask[rows], texts=[self.texts[r] for r in rows],
        scores={k: v[groups] for k, v in self.scores.items()}, rewards=self.rewards[groups])

  @staticmethod
  def concat(parts: Sequence["Groups"]) -> "Groups":
    return Groups(
        encoded=[e for p in parts for e in p.encoded], puzzles=[z for p in parts for z in p.puzzles],
        tokens=np.concatenate([p.tokens for p in parts]),
        mask=np.concatenate([p.mask for p in parts]),
        texts=[t for p in parts for t in p.texts],
        scores={k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
        rewards=np.concatenate([p.rewards for p in parts]))


def informative(groups: Groups) -> np.ndarray:
  """bool [P]: groups whose rewards are not all equal."""
  return ~np.asarray(advantages_lib.zero_variance_groups(groups.rewards))


def count_informative(draws: Sequence[Groups]) -> int:
  return int(sum(informative(d).sum() for d in draws))


def pick_groups(draws: Sequence[Groups], size: int) -> np.ndarray:
  """Which `size` groups (indices into the draws' groups, in draw order) the update trains on:
  those with a learning signal first, in draw order; if there are fewer, zero-variance groups
  (in draw order) fill the rest."""
  signal = np.concatenate([informative(d) for d in draws])
  if len(signal) < size:
    raise ValueError(f"{len(signal)} groups drawn, fewer than the batch of {size}.")
  return np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])[:size]


def fill_batch(draws: Sequence[Groups], size: int) -> Groups:
  """The `pick_groups` groups of the draws."""
  return Groups.concat(draws).take(pick_groups(draws, size))


def any_process(flag: bool) -> bool:
  """True if `flag` is true in any process, so that all processes draw equally often (each draw
  runs the sharded sampler, a collective every process must join)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
