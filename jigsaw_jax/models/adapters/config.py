"""Adapter hyper-parameters and which projection gets which adapter: a leaf module (no model
code), so that model configs and layers can import it without import cycles."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

# GraphMoE's ways to combine a rethinking step with the token state, and the experts' input.
COMBINES = ("concat_proj", "gated_residual", "add")
EXPERT_INPUTS = ("token", "refined")
# The FFN projections that expert kinds may carry LoRA experts on.
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class AdapterKind:
  """How a kind adapts the FFN ('lora' per projection, or 'experts') and whether it can merge."""

  ffn: Optional[str]
  mergeable: bool
  rethink: bool = False


KINDS: Dict[str, AdapterKind] = {
    "none": AdapterKind(ffn=None, mergeable=True),
    "lora": AdapterKind(ffn="lora", mergeable=True),
    "moe_lora": AdapterKind(ffn="experts", mergeable=False),
    "graph_moe": AdapterKind(ffn="experts", mergeable=False, rethink=True),
}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Adapter hyper-parameters (hashable: flax modules hold it as a static attribute).

  Defaults follow MixLoRA's README (r 8, alpha 16, 8 experts top-2, router init 0.02, balance
  coefficient 0.01; targets q, v, gate, up, down) except `experts` = 4, a size that suits the
  CPU miniature; GraphMoE's own knobs (steps, combine, expert_input) are this project's choices,
  documented in graph_moe.py.
  """

  kind: str = "lora"  # lora | moe_lora | graph_moe ('none' is ModelConfig.adapter = None)
  rank: int = 8  # LoRA rank (and the experts' rank unless expert_rank is set)
  alpha: float = 16.0  # the update is scaled by alpha / rank
  dropout: float = 0.0  # on adapter inputs, in steps given a 'dropout' rng
  # Regex searched in each projection's path inside the decoder, e.g. 'layers_3/mlp/up_proj'.
  targets: str = "q_proj|v_proj|gate_proj|up_proj|down_proj"
  experts: int = 4  # E
  top_k: int = 2
  expert_rank: int = 0  # 0: same as rank
  attention_experts: bool = False  # experts (not plain LoRA) on targeted attention projections
  steps: int = 2  # GraphMoE's rethinking steps T (graph_moe only)
  combine: str = "concat_proj"  # concat_proj | gated_residual | add (graph_moe only)
  expert_input: str = "token"  # token | refined (graph_moe only)
  balance_coef: float = 0.01  # weight of the mean Switch balance loss in the training loss
  router_init_std: float = 0.02

  def __post_init__(self):
    problems = []
    if self.kind not in KINDS or self.kind == "none":
      problems.append(f"kind must be one of {sorted(k for k in KINDS if k != 'none')} (or "
                      f"'none' in config.adapter for no adapter), got {self.kind!r}")
    if self.rank < 1 or self.expert_rank < 0:
      problems.append(f"rank must be >= 1 and expert_rank >= 0, got {self.rank}, "
                      f"{self.expert_rank}")
    if self.experts < 1 or not 1 <= self.top_k <= self.experts:
      problems.append(f"need 1 <= top_k <= experts, got top_k={self.top_k}, "
                      f"experts={self.experts}")
    if self.steps < 1:
      problems.append(f"steps must be >= 1, got {self.steps}")
    if self.combine not in COMBINES:
      problems.append(f"combine must be one of {COMBINES}, got {self.combine!r}")
    if self.expert_input not in EXPERT_INPUTS:
      problems.append(f"expert_input must be one of {EXPERT_INPUTS}, got "
                      f"{self.expert_input!r}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"dropout must be in [0, 1), got {self.dropout}")
    try:
      re.compile(self.targets)
    except re.error as e:
      problems.append(f"targets {self.targets!r} is not a regular expression ({e})")
    if problems:
      raise ValueError("Invalid adapter config: " + "; ".join(problems) + ".")

  @property
  def spec(self) -> AdapterKind:
    return KINDS[self.kind]


def from_config(adapter: Any) -> Optional[AdapterConfig]:
  """AdapterConfig from `config.adapter` (a ConfigDict or mapping); None when kind is 'none'."""
  if adapter is None:
    return None
  fields = dict(adapter.to_dict() if hasattr(adapter, "to_dict") else adapter)
  if fields.get("kind", "none") == "none":
    return None
  known = {f.name for f in dataclasses.fields(AdapterConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.adapter has unknown fields {unknown}; known: {sorted(known)}.")
  return AdapterConfig(**fields)


def projection_adapter(cfg: Optional[AdapterConfig], path: Tuple[str, ...],
                       in_ffn: bool) -> Optional[str]:
  """'lora', 'experts' or None for the projection at `path` (module names inside the decoder).

  FFN projections under the expert kinds get None here: the MLP routes its experts as a block.
  """
  if cfg is None or not re.search(cfg.targets, "/".join(path)):
    return None
  if cfg.spec.ffn == "experts":
    if in_ffn:
      return None
    return "experts" if cfg.attention_experts else "lora"
  return "lora"


def ffn_expert_targets(cfg: Optional[AdapterConfig], path: Tuple[str, ...]) -> Tuple[str, ...]:
  """The FFN projections carrying expert LoRAs in the MLP at `path` (empty: no experts here)."""
  if cfg is None or cfg.spec.ffn != "experts":
    return ()
  return tuple(name for name in FFN_PROJECTIONS
               if re.search(cfg.targets, "/".join(tuple(path) + (name,))))
