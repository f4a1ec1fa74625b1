"""GraphMoE (Tang et al. 2025, arXiv 2501.07890): LoRA experts with recurrent routing.

The paper links the LoRA experts of a MoE block into a "pseudo graph" and lets information flow
between expert nodes through a *self-rethinking* loop: the block is routed T times and the output
of the experts chosen at one step is the signal that selects the next step's experts. Its method
section and code are not public (shared/reference/methods.md lists what is known), so the details
below are this project's choices; each is a config field, so the paper's design can be dropped in.

The loop, on top of MoE-LoRA's FFN experts (moe_lora.py, same parameters and names):

    x                   the token state entering the FFN (after post_attention_layernorm)
    logits_1 = x W_r                                          step 1: exactly MoE-LoRA's router
    y_t      = sum_e w_e(logits_t) FFN_e(x_t)                 the mixed expert output of step t
    m_t      = y_t / rms(y_t)                                 the message, on x's scale
    logits_{t+1} = combine(x, m_t)                            the router re-reads token + message
    output   = y_T

Choices (not in the public sources):

  * What recurs: the mixed expert output y_t (the sum the router produced), RMS-normalised without
    a learned scale so that it is on the same scale as the normalised token state. Not a GRU state
    and not an explicit adjacency: the "graph" is implicit in which experts a message selects.
  * combine (`AdapterConfig.combine`):
      - 'concat_proj' (default): the router reads the concatenation [x; m] through one linear map
        (2H -> E): logits = x W_r + m W_m. W_m [H, E] is the only new parameter, N(0, 0.02).
      - 'gated_residual': logits = (x + g m) W_r with a per-token gate
        g = sigmoid(x.w_x + m.w_m + b) (combine_gate_{x,m,b}), zero-initialised: g starts at 0.5.
      - 'add': logits = (x + m) W_r, no new parameters.
  * What the experts read (`AdapterConfig.expert_input`):
      - 'token' (default): x at every step. The experts' activations are computed once and the
        steps re-route and re-mix them, so extra steps cost routing and the down projection,
        not the whole FFN; memory is MoE-LoRA's.
      - 'refined': x_{t+1} = x + (y_t - FFN(x)): the token state plus the adapter's correction
        of the previous step (zero for fresh experts, so zero-init still leaves the model
        unchanged). Each step reruns the FFN, T times the compute.
  * Load balance: every step's routing sows its own Switch loss; training averages them.
  * Placement: the loop sits on the FFN block, where token state and mixed output share the hidden
    width. Attention projections (plain LoRA, or `attention_experts`) route once.

With T = 1 none of the combine parameters exist and the computation is MoE-LoRA's, operation for
operation (tests/models/test_adapters.py checks equality on the same parameters).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jigsaw_jax.models.adapters import lora
from jigsaw_jax.models.adapters.config import COMBINES, EXPERT_INPUTS
from jigsaw_jax.models.adapters.moe_lora import MoEFFN

Array = jax.Array


def message(y: Array, eps: float = 1e-6) -> Array:
  """The mixed output, RMS-normalised over the hidden axis (no learned scale)."""
  yf = y.astype(jnp.float32)
  return (yf * jax.lax.rsqrt(jnp.mean(yf * yf, axis=-1, keepdims=True) + eps)).astype(y.dtype)


class RethinkingFFN(MoEFFN):
  """MoE-LoRA experts routed `cfg.steps` times; see the module docstring."""

  def setup(self):
    super().setup()
    cfg, h = self.cfg, self.hidden_size
    if cfg.combine not in COMBINES:
      raise ValueError(f"adapter.combine must be one of {COMBINES}, got {cfg.combine!r}.")
    if cfg.expert_input not in EXPERT_INPUTS:
      raise ValueError(f"adapter.expert_input must be one of {EXPERT_INPUTS}, got "
                       f"{cfg.expert_input!r}.")
    if cfg.steps > 1:  # T = 1 is MoE-LoRA: no parameters of its own.
      var = lambda name, init, shape, axes: lora.adapter_variable(self, name, init, shape, axes,
                                                                  self.param_dtype)
      if cfg.combine == "concat_proj":
        self.router_message = var("router_message", nn.initializers.normal(cfg.router_init_std),
                                  (h, cfg.experts), ("embed", None))
      elif cfg.combine == "gated_residual":
        self.gate_x = var("combine_gate_x", nn.initializers.zeros, (h,), ("embed",))
        self.gate_m = var("combine_gate_m", nn.initializers.zeros, (h,), ("embed",))
        self.gate_b = var("combine_gate_b", nn.initializers.zeros, (), ())

  def combine(self, x: Array, token_logits: Array, m: Array) -> Array:
    """Router logits of the next step from the token state x and the message m."""
    kind = self.cfg.combine
    if kind == "concat_proj":
      return token_logits + jnp.einsum("...h,he->...e", m, self.router_message.astype(self.dtype))
    if kind == "gated_residual":
      g = jax.nn.sigmoid(x @ self.gate_x.astype(self.dtype) + m @ self.gate_m.astype(self.dtype)
                         + self.gate_b.astype(self.dtype))
      return self.router_logits(x + g[..., None] * m)
    return self.router_logits(x + m)  # 'add'

  def __call__(self, x: Array, gate_proj: Callable, up_proj: Callable, down_proj: Callable,
               act: Callable) -> Array:
    acts = self.experts(x, gate_proj, up_proj, act)
    token_logits = self.router_logits(x)
    logits, base_out = token_logits, None
    for step in range(self.cfg.steps):
      y = self.mix(acts, self.route(logits), down_proj)
      if step == self.cfg.steps - 1:
        return y
      logits = self.combine(x, token_logits, message(y))
      if self.cfg.expert_input == "refined":
        if base_out is None:
          base_out = down_proj(acts["base"])
        acts = self.experts(x + (y - base_out), gate_proj, up_proj, act)
    raise AssertionError("unreachable: cfg.steps >= 1")
