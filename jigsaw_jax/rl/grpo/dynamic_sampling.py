"""DAPO's dynamic sampling: train only on groups whose G completions differ.

A group whose G completions all earn the same reward has advantage 0 everywhere: it adds nothing
to the policy gradient but its KL term, and it dilutes the batch. With `config.rl.dynamic_sampling`
the trainer keeps drawing batches of puzzles (a new rollout each) until it holds
`prompts_per_batch` informative groups, at most `config.rl.max_draws` draws per step. The batch
is then the informative groups in draw order, the first `prompts_per_batch` of them.

Which groups are informative (`config.rl.dynamic_sampling_metric`):
* "accuracy" (default): the accuracy reward is not the same for all G samples. DAPO (Yu et al.
  2025, §3.2) over-samples and drops prompts whose accuracy is all 1 or all 0; verl's DAPO recipe
  keeps a prompt when the std of `algorithm.filter_groups.metric` over its samples is > 0, with
  `metric=acc` in DAPO's scripts. A group that is all wrong but mixes formats is not informative.
* "reward": the reward the advantages are computed from (accuracy + 0.5 * format, plus the
  overlong penalty when it is on) is not the same for all G samples (verl's `metric=score` /
  `seq_reward`); every group with a nonzero advantage counts.

At the cap (`config.rl.dynamic_sampling_at_cap`):
* "fill" (default): zero-variance groups, in draw order, complete the batch, so that the update
  keeps its fixed, compiled shape and the step goes on (`dynamic/zero_variance_kept` > 0 says so).
* "raise": stop with an error, as verl does once `num_gen_batches` reaches
  `max_num_gen_batches` (verl's max_num_gen_batches=0 draws without a cap; here max_draws >= 1).

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
        puzzles=[self.puzzles[g] for g in groups],
        tokens=self.tokens[rows], mask=self.mask[rows], texts=[self.texts[r] for r in rows],
        scores={k: v[groups] for k, v in self.scores.items()}, rewards=self.rewards[groups])

  @staticmethod
  def concat(parts: Sequence["Groups"]) -> "Groups":
    return Groups(
        puzzles=[z for p in parts for z in p.puzzles],
        tokens=np.concatenate([p.tokens for p in parts]),
        mask=np.concatenate([p.mask for p in parts]),
        texts=[t for p in parts for t in p.texts],
        scores={k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
        rewards=np.concatenate([p.rewards for p in parts]))


# config.rl.dynamic_sampling_metric -> the [P, G] values whose spread makes a group informative.
METRICS = {
    "accuracy": lambda groups: groups.scores["accuracy"],
    "reward": lambda groups: groups.rewards,
}
AT_CAP = ("fill", "raise")


def check_options(metric: str, at_cap: str = "fill") -> None:
  """Refuses an unknown `config.rl.dynamic_sampling_metric` or `dynamic_sampling_at_cap`."""
  if metric not in METRICS:
    raise ValueError(f"config.rl.dynamic_sampling_metric={metric!r}; expected one of "
                     f"{sorted(METRICS)}.")
  if at_cap not in AT_CAP:
    raise ValueError(f"config.rl.dynamic_sampling_at_cap={at_cap!r}; expected one of "
                     f"{list(AT_CAP)}.")


def informative(groups: Groups, metric: str = "accuracy") -> np.ndarray:
  """bool [P]: groups whose `metric` values are not all equal."""
  check_options(metric)
  values = np.asarray(METRICS[metric](groups), np.float32)
  return ~np.asarray(advantages_lib.zero_variance_groups(values))


def count_informative(draws: Sequence[Groups], metric: str = "accuracy") -> int:
  return int(sum(informative(d, metric).sum() for d in draws))


def pick_groups(draws: Sequence[Groups], size: int, metric: str = "accuracy",
                at_cap: str = "fill") -> np.ndarray:
  """Which `size` groups (indices into the draws' groups, in draw order) the update trains on:
  the informative ones first, in draw order; if there are fewer, zero-variance groups (in draw
  order) fill the rest (`at_cap="fill"`) or a ValueError says so (`at_cap="raise"`)."""
  check_options(metric, at_cap)
  signal = np.concatenate([informative(d, metric) for d in draws])
  if len(signal) < size:
    raise ValueError(f"{len(signal)} groups drawn, fewer than the batch of {size}.")
  if at_cap == "raise" and signal.sum() < size:
    raise ValueError(
        f"Dynamic sampling found {int(signal.sum())} groups whose {metric} varies in "
        f"{len(draws)} draws, fewer than the batch of {size} (config.rl.max_draws reached). The "
        "puzzles may be too easy or too hard for the policy: raise config.rl.max_draws, or set "
        "config.rl.dynamic_sampling_at_cap=fill to complete the batch with zero-variance groups.")
  return np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])[:size]


def fill_batch(draws: Sequence[Groups], size: int, metric: str = "accuracy",
               at_cap: str = "fill") -> Groups:
  """The `pick_groups` groups of the draws."""
  return Groups.concat(draws).take(pick_groups(draws, size, metric, at_cap))


def any_process(flag: bool) -> bool:
  """True if `flag` is true in any process, so that all processes draw equally often (each draw
  runs the sharded sampler, a collective every process must join)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
