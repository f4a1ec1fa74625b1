"""Trainable adapters on the frozen policy: LoRA, MoE-LoRA and GraphMoE.

    adapter = AdapterConfig(kind="graph_moe", rank=8, experts=4, top_k=2, steps=2)
    cfg = dataclasses.replace(model_cfg, adapter=adapter)          # the adapted policy's shape
    variables = {**base_variables, **mllm.init_adapters(cfg, rng)}  # {'params', 'adapter'}
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

from typing import Any, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp

from jigsaw_jax.models.adapters import graph_moe, lora, moe_lora
from jigsaw_jax.models.adapters.config import (KINDS, AdapterConfig, AdapterKind,
                                               ffn_expert_targets, from_config,
                                               projection_adapter)

COLLECTION = lora.COLLECTION  # 'adapter'
LOSSES = moe_lora.LOSSES  # 'losses'


def ffn_module(cfg: AdapterConfig):
  """The FFN expert block class of this kind: MoE-LoRA, or GraphMoE's rethinking loop."""
  return graph_moe.RethinkingFFN if cfg.spec.rethink else moe_lora.MoEFFN


# -- variables ------------------------------------------------------------------------------


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
           "split", "join", "balance_loss", "count_params", "merge_adapters",
           "projection_adapter", "ffn_expert_targets", "ffn_module", "lora", "moe_lora",
           "graph_moe"]
