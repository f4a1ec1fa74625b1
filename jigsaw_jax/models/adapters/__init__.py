"""Trainable adapters on the frozen policy: LoRA, MoE-LoRA and GraphMoE.

    adapter = AdapterConfig(kind="graph_moe", rank=8, experts=4, top_k=2, steps=2)
    cfg = dataclasses.replace(model_cfg, adapter=adapter)          # the adapted policy's shape
    variables = {**base_variables, **init_adapters(cfg, rng)}      # {'params', 'adapter'}
    out = VisionLanguageModel(cfg).apply(variables, ...)           # base + adapters
    ref = VisionLanguageModel(cfg).apply(variables, ..., adapters_enabled=False)  # the base alone
    out, state = model.apply(variables, ..., mutable=["losses"])   # + sown MoE balance losses
    aux = balance_loss(state)                                      # mean over layers and steps
    trainable, frozen = split(variables)                           # train `trainable` only
    base = merge_adapters(variables, cfg)                          # LoRA folded in, for save_hf

Adapter variables live in their own flax collection, 'adapter', at the path of the module they
wrap (e.g. adapter/decoder/layers_0/self_attn/q_proj/lora/{a,b}, adapter/decoder/layers_0/mlp/moe/
{router, gate_a, ...}); the 'params' tree is the base model's, unchanged. So the base never
receives a gradient (steps differentiate the 'adapter' collection only), a checkpoint holds the
adapter and its optimizer state only, and the KL reference is the same weights with
`adapters_enabled=False`. Adapters attach to the text decoder; the vision tower stays frozen.

Kinds (the registry `KINDS`):
  lora       LoRA on every projection whose path matches `targets` (lora.py). Mergeable.
  moe_lora   E LoRA experts on the FFN behind a top-k router with a Switch balance loss; targeted
             attention projections get plain LoRA, or their own experts with
             `attention_experts=True` (moe_lora.py). Not mergeable (routing is input-dependent).
  graph_moe  MoE-LoRA routed `steps` times, the router re-reading the token state combined with
             the previous step's mixed expert output (graph_moe.py). Not mergeable.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

from jigsaw_jax.models.adapters import graph_moe, lora, moe_lora

COLLECTION = lora.COLLECTION  # 'adapter'
LOSSES = moe_lora.LOSSES  # 'losses'


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
    if self.combine not in graph_moe.COMBINES:
      problems.append(f"combine must be one of {graph_moe.COMBINES}, got {self.combine!r}")
    if self.expert_input not in graph_moe.EXPERT_INPUTS:
      problems.append(f"expert_input must be one of {graph_moe.EXPERT_INPUTS}, got "
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


# -- which module gets which adapter ----------------------------------------------------------


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
  return tuple(name for name in moe_lora.FFN_PROJECTIONS
               if re.search(cfg.targets, "/".join(tuple(path) + (name,))))


def ffn_module(cfg: AdapterConfig):
  """The FFN expert block class of this kind: MoE-LoRA, or GraphMoE's rethinking loop."""
  return graph_moe.RethinkingFFN if cfg.spec.rethink else moe_lora.MoEFFN


# -- variables ------------------------------------------------------------------------------


def init_adapters(model_cfg: Any, rng: jax.Array) -> Dict[str, Any]:
  """Fresh adapter variables {'adapter': ...} of an adapted ModelConfig (zero-effect at init).

  Runs the model's init under jit returning only the adapter collection, so the base weights it
  would create are never materialised (XLA drops them).
  """
  import flax.linen as nn
  from jigsaw_jax.models import mllm
  if getattr(model_cfg, "adapter", None) is None:
    raise ValueError("init_adapters needs a ModelConfig with an adapter (cfg.adapter is None).")
  module = mllm.VisionLanguageModel(model_cfg)
  inputs = mllm.dummy_inputs(model_cfg)
  grid = inputs.pop("image_grid_thw", None)
  init = lambda r: {COLLECTION: nn.unbox(module.init(r, **inputs, image_grid_thw=grid))[
      COLLECTION]}
  return jax.jit(init)(rng)


def split(variables: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(trainable, frozen): the adapter collection and the rest when there are adapters, else
  (everything, {}): full fine-tuning."""
  variables = dict(variables)
  if COLLECTION in variables:
    trainable = {COLLECTION: variables.pop(COLLECTION)}
    return trainable, variables
  return variables, {}


def join(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Dict[str, Any]:
  """The inverse of `split`."""
  return {**frozen, **trainable}


def balance_loss(state: Mapping[str, Any]) -> jax.Array:
  """Mean of the balance losses sown in `state` (what apply(..., mutable=['losses']) returns);
  0 when there are none (LoRA)."""
  leaves = jax.tree_util.tree_leaves(state.get(LOSSES, {}))
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.asarray(x, jnp.float32) for x in leaves) / len(leaves)


def count_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def merge_adapters(variables: Mapping[str, Any], model_cfg: Any) -> Dict[str, Any]:
  """{'params': base with every LoRA folded into its kernel}: the adapted policy as a plain
  model, for `hf_io.save_hf(merged, base_cfg, ...)` or any consumer of the base layout.
  `model_cfg` is the adapted ModelConfig (or its AdapterConfig).

  Exact for LoRA (kernel + alpha/r * A B, computed in float32). MoE-LoRA and GraphMoE are refused:
  their routing weights depend on each token, so no single kernel reproduces them.
  """
  cfg = model_cfg if isinstance(model_cfg, AdapterConfig) else getattr(model_cfg, "adapter", None)
  if cfg is None or COLLECTION not in variables:
    return {"params": variables["params"]}
  if not cfg.spec.mergeable:
    raise ValueError(
        f"adapter kind {cfg.kind!r} cannot be merged into the base weights: its experts are "
        "mixed with per-token routing weights, which no fixed kernel reproduces. Export the "
        "base (variables['params']) and the adapter checkpoint separately, or train kind='lora' "
        "for a mergeable adapter.")
  params = flax.core.unfreeze(variables["params"])
  flat_adapter = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[COLLECTION]))
  flat_params = flax.traverse_util.flatten_dict(params)
  for path, a in flat_adapter.items():
    if path[-2:] != ("lora", "a"):
      continue
    owner = path[:-2]
    b = flat_adapter[owner + ("lora", "b")]
    kernel_path = owner + ("kernel",)
    if kernel_path not in flat_params:
      raise KeyError(f"adapter at {'/'.join(owner)} has no base kernel {'/'.join(kernel_path)}.")
    flat_params[kernel_path] = lora.merge_kernel(flat_params[kernel_path], a, b, cfg.alpha)
  return {"params": flax.traverse_util.unflatten_dict(flat_params)}


__all__ = ["AdapterConfig", "AdapterKind", "KINDS", "COLLECTION", "LOSSES", "from_config",
           "init_adapters", "split", "join", "balance_loss", "count_params", "merge_adapters",
           "projection_adapter", "ffn_expert_targets", "ffn_module", "lora", "moe_lora",
           "graph_moe"]
