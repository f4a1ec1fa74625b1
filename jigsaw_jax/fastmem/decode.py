"""FastMem's answers: greedy decoding with the memorised weights, and FastMem+CD, which contrasts
them with the original weights' logits, (1 + a)*z_mem - a*z_orig, each model on its own KV cache.
Both are token hooks of the shared decode loop (generate/)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from jigsaw_jax.generate.hooks import GreedyHook
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch

Params = Dict[str, Any]


def contrastive_logits(z_mem: jax.Array, z_orig: jax.Array, alpha: float) -> jax.Array:
  """FastMem+CD: (1 + α)·z_mem − α·z_orig."""
  return (1.0 + alpha) * z_mem - alpha * z_orig


@dataclasses.dataclass(frozen=True)
class ContrastiveHook(GreedyHook):
  """FastMem+CD's token choice: greedy on `contrastive_logits` of the two models that decode in
  lockstep, (memorised, original)."""

  alpha: float = 0.5

  def scores(self, model_out) -> jax.Array:
    memorised, original = model_out
    return contrastive_logits(memorised.logits, original.logits, self.alpha)


class GreedyDecoder:
  """Greedy decoding of a VisionLanguageModel (text-only when cfg.vision is None) with a KV
  cache; with `alpha > 0` each step also runs `orig_params` on its own cache and decodes
  `contrastive_logits`. The rollout Sampler's prompts, positions and stopping rule: it is that
  Sampler, with a greedy hook and one cache of prompt + max_new_tokens slots per row."""

  def __init__(self, model_cfg: ModelConfig, *, max_new_tokens: int, eos_ids: Sequence[int],
               pad_id: int, suppress_ids: Sequence[int] = (), alpha: float = 0.0):
    self.alpha = float(alpha)
    suppress_ids = tuple(int(s) for s in suppress_ids)
    hook = (ContrastiveHook(suppress_ids, self.alpha) if self.alpha > 0
            else GreedyHook(suppress_ids))
    rollout = RolloutConfig(max_new_tokens=int(max_new_tokens), group_size=1,
                            eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
    self.sampler = Sampler(model_cfg, rollout, hook, cache_layout="contiguous")

  def __call__(self, params: Params, batch: PromptBatch,
               orig_params: Optional[Params] = None) -> List[List[int]]:
    """Completion token ids per row, each up to and including its first EOS."""
    contrast = self.alpha > 0
    if contrast and orig_params is None:
      raise ValueError("FastMem+CD (alpha > 0) needs orig_params, the unmemorised weights.")
    out = self.sampler.generate((params, orig_params) if contrast else params, batch,
                                jax.random.key(0))  # greedy: the key is never read
    return [row[m].tolist() for row, m in zip(np.asarray(out.tokens), np.asarray(out.mask))]
