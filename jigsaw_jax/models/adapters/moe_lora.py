"""MoE-LoRA: E LoRA experts behind a top-k router, MixLoRA-style (Li et al. 2024).

On the feed-forward block every expert is the whole frozen SwiGLU FFN with its own LoRA on the
targeted projections (gate/up/down), and the block's output is the gate-weighted sum of the chosen
experts' outputs:

    p = softmax(x W_r)                            router, [H, E], N(0, 0.02) (MixLoRA's init range)
    S = top_k(p);  w_e = p_e / sum_{j in S} p_j   (0 outside S: Mixtral's renormalised top-k)
    FFN_e(x) = (W_d + s B_de A_de) [act((W_g + s B_ge A_ge) x) * (W_u + s B_ue A_ue) x]
    y = sum_e w_e FFN_e(x)                        s = alpha / rank

Because the down projection is linear and the weights sum to one, this is computed as
`W_d a + s sum_e w_e B_de A_de a_e` with `a = a_0 + sum_e w_e (a_e - a_0)` (a_0 the base
activation): the frozen weights run once per step, and zero-initialised experts (B = 0) give
exactly the base output, bit for bit. The experts are evaluated densely (all E per token, weights
zero outside the top k): simple and shardable, at E times the (small) LoRA cost and E copies of the
[tokens, intermediate] activation; a grouped-matmul dispatch would cut that for large E.

Attention projections keep plain LoRA (as in MixLoRA) unless `attention_experts` is set; then each
targeted projection gets its own router and E LoRA experts whose deltas mix with the same top-k
weights (`ProjectionExperts`).

Load balance (Switch Transformer, Fedus et al. 2021, generalised to top-k as in Mixtral):

    loss = E * sum_e f_e * P_e,  f_e = share of the top-k assignments that went to e,
                                 P_e = mean router probability of e over the tokens

It equals 1 when routing is uniform and grows as routing concentrates (up to E). Each routing
call sows its value into the 'losses' collection (`self.sow('losses', 'balance', ...)`); the
training step averages them (`adapters.balance_loss`) and adds `balance_coef` times the mean.
Positions are all tokens of the batch, padding included (the block does not see the mask).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.models.adapters import lora

Array = jax.Array
LOSSES = "losses"


def route(logits: Array, top_k: int) -> Tuple[Array, Array]:
  """(weights [..., E] in logits' dtype, zero outside the top k and summing to 1; balance loss)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  num_experts = probs.shape[-1]
  if top_k >= num_experts:
    chosen = jnp.ones_like(probs)
    weights = probs
  else:
    top, index = jax.lax.top_k(probs, top_k)
    one_hot = jax.nn.one_hot(index, num_experts, dtype=probs.dtype)  # [..., k, E]
    chosen = one_hot.sum(-2)
    weights = jnp.einsum("...k,...ke->...e", top / top.sum(-1, keepdims=True), one_hot)
  return weights.astype(logits.dtype), balance_loss(probs, chosen, min(top_k, num_experts))


def expert_matmul(x: Array, w: Array) -> Array:
  """x [..., E, d] times each expert's w [E, d, o] -> [..., E, o], as one GEMM with a
  block-diagonal [E*d, E*o] weight. XLA lowers the equivalent batched einsum (batch axis in the
  middle) to a loop of small products: on CPU this is 3-5x faster at the tiny preset's sizes, and
  the wasted MACs (E times the LoRA's) stay small next to the frozen FFN's."""
  e, d, o = w.shape
  block = (jnp.eye(e, dtype=w.dtype)[:, None, :, None] * w[:, :, None, :]).reshape(e * d, e * o)
  lead = x.shape[:-2]
  return (x.reshape(lead + (e * d,)) @ block).reshape(lead + (e, o))


def balance_loss(probs: Array, chosen: Array, top_k: int) -> Array:
  """Switch-style auxiliary loss: E * sum_e f_e P_e (1 for uniform routing). probs and chosen
  (0/1 selection mask) are [..., E]; every leading position counts once."""
  num_experts = probs.shape[-1]
  f = jnp.mean(chosen.reshape(-1, num_experts), axis=0) / top_k
  p = jnp.mean(probs.reshape(-1, num_experts), axis=0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def sow_balance(module: nn.Module, loss: Array) -> None:
  """Records a balance loss in 'losses' (kept only by applies that make it mutable). Not at init:
  the initial variables would otherwise carry a 'losses' collection that later sows append to."""
  if not module.is_initializing():
    module.sow(LOSSES, "balance", loss)


class ProjectionExperts(nn.Module):
  """E LoRA experts on one projection with their own router; returns the mixed delta."""

  features: Tuple[int, ...]
  in_axes: Tuple[Any, ...]
  out_axes: Tuple[Any, ...]
  cfg: Any  # AdapterConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, contract = self.cfg, len(self.in_axes)
    e, r = cfg.experts, cfg.expert_rank or cfg.rank
    in_shape = tuple(x.shape[-contract:])
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    var = lambda name, init, shape, axes: lora.adapter_variable(self, name, init, shape, axes,
                                                                self.param_dtype)
    router = var("router", nn.initializers.normal(cfg.router_init_std), in_shape + (e,),
                 tuple(self.in_axes) + (None,))
    a = var("a", lora.fan_in_uniform(fan_in), (e,) + in_shape + (r,),
            (None,) + tuple(self.in_axes) + (None,))
    b = var("b", nn.initializers.zeros, (e, r) + tuple(self.features),
            (None, None) + tuple(self.out_axes))
    ins = "abcd"[:contract]
    outs = "fghi"[:len(self.features)]
    x = x.astype(self.dtype)
    weights, loss = route(jnp.einsum(f"...{ins},{ins}e->...e", x, router.astype(self.dtype)),
                          cfg.top_k)
    sow_balance(self, loss)
    xd = lora.dropout(self, x, cfg.dropout)
    z = jnp.einsum(f"...{ins},e{ins}r->...er", xd, a.astype(self.dtype)) * weights[..., None]
    y = jnp.einsum(f"...er,er{outs}->...{outs}", z, b.astype(self.dtype))
    return y * jnp.asarray(cfg.alpha / r, self.dtype)


# What one evaluation of the experts leaves for mixing (`MoEFFN.mix`): 'base' [..., I], and with
# expert LoRAs on gate/up also 'experts' (each expert's activation) and 'diff' (minus the base),
# both [..., E, I].
ExpertActivations = Dict[str, Array]


class MoEFFN(nn.Module):
  """E LoRA experts on a frozen SwiGLU FFN with a top-k router (one routing step).

  Called by `layers.MLP` with the FFN's own (frozen) projections:
  `MoEFFN(...)(x, gate_proj, up_proj, down_proj, act) -> y [..., H]`.
  """

  hidden_size: int
  intermediate_size: int
  targets: Tuple[str, ...]  # which of FFN_PROJECTIONS carry expert LoRAs
  cfg: Any  # AdapterConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    e, r = cfg.experts, cfg.expert_rank or cfg.rank
    h, i = self.hidden_size, self.intermediate_size
    var = lambda name, init, shape, axes: lora.adapter_variable(self, name, init, shape, axes,
                                                                self.param_dtype)
    self.router = var("router", nn.initializers.normal(cfg.router_init_std), (h, e),
                      ("embed", None))
    shapes = {"gate_proj": (h, i, "embed", "mlp"), "up_proj": (h, i, "embed", "mlp"),
              "down_proj": (i, h, "mlp", "embed")}
    lora_a, lora_b = {}, {}
    for name in self.targets:
      d_in, d_out, ax_in, ax_out = shapes[name]
      key = name.split("_")[0]
      lora_a[name] = var(f"{key}_a", lora.fan_in_uniform(d_in), (e, d_in, r),
                         (None, ax_in, None))
      lora_b[name] = var(f"{key}_b", nn.initializers.zeros, (e, r, d_out), (None, None, ax_out))
    self.lora_a, self.lora_b = lora_a, lora_b
    self.scale = cfg.alpha / r

  # -- pieces shared with GraphMoE's rethinking loop (graph_moe.py) ---------------------------

  def _delta(self, name: str, x: Array) -> Array:
    """s * B_e A_e dropout(x) for every expert: [..., d_in] -> [..., E, d_out]."""
    x = lora.dropout(self, x, self.cfg.dropout)
    a = self.lora_a[name].astype(self.dtype)  # [E, d, r]: all experts' A side by side
    z = (x @ a.transpose(1, 0, 2).reshape(a.shape[1], -1)).reshape(x.shape[:-1] + (a.shape[0], -1))
    y = expert_matmul(z, self.lora_b[name].astype(self.dtype))
    return y * jnp.asarray(self.scale, self.dtype)

  def experts(self, x: Array, gate_proj: Callable, up_proj: Callable,
              act: Callable) -> ExpertActivations:
    """Every expert's FFN activation on `x`: the base one [..., I] and per-expert differences
    from it [..., E, I] (exactly zero for zero-initialised experts)."""
    x = x.astype(self.dtype)
    gate, up = gate_proj(x), up_proj(x)
    base = act(gate) * up
    out = {"base": base}
    if "gate_proj" in self.targets or "up_proj" in self.targets:
      g = gate[..., None, :] + (self._delta("gate_proj", x) if "gate_proj" in self.targets
                                else 0)
      u = up[..., None, :] + (self._delta("up_proj", x) if "up_proj" in self.targets else 0)
      out["experts"] = act(g) * u
      out["diff"] = out["experts"] - base[..., None, :]
    return out

  def router_logits(self, x: Array) -> Array:
    return jnp.einsum("...h,he->...e", x.astype(self.dtype), self.router.astype(self.dtype))

  def route(self, logits: Array) -> Array:
    weights, loss = route(logits, self.cfg.top_k)
    sow_balance(self, loss)
    return weights

  def mix(self, acts: ExpertActivations, weights: Array, down_proj: Callable) -> Array:
    """sum_e w_e FFN_e(x), given the experts' activations and routing weights [..., E]."""
    a = acts["base"]
    if "diff" in acts:
      a = a + jnp.sum(weights[..., None] * acts["diff"], axis=-2)
    y = down_proj(a)
    if "down_proj" in self.targets:
      down_a = self.lora_a["down_proj"].astype(self.dtype)
      if "experts" in acts:  # each expert's own activation
        xd = lora.dropout(self, acts["experts"], self.cfg.dropout)
        z = expert_matmul(xd, down_a)
      else:  # gate/up untouched: all experts share the base activation
        xd = lora.dropout(self, acts["base"], self.cfg.dropout)
        z = jnp.einsum("...i,eir->...er", xd, down_a)
      z = z * weights[..., None]
      y = y + jnp.einsum("...er,erh->...h", z, self.lora_b["down_proj"].astype(self.dtype)) \
          * jnp.asarray(self.scale, self.dtype)
    return y

  def __call__(self, x: Array, gate_proj: Callable, up_proj: Callable, down_proj: Callable,
               act: Callable) -> Array:
    acts = self.experts(x, gate_proj, up_proj, act)
    return self.mix(acts, self.route(self.router_logits(x)), down_proj)
