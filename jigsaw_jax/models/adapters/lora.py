"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A dropout(x), with W frozen.

A wraps one `layers.Projection` (any number of contracted input axes, any number of feature axes):

    A: [in..., r]   uniform(+-1/sqrt(fan_in)), PEFT's kaiming_uniform(a=sqrt(5)) bound
    B: [r, out...]  zeros, so a fresh adapter leaves the model's outputs exactly unchanged

Both live in the 'adapter' collection, at the wrapped projection's path plus '/lora', so the base
'params' tree never changes shape and merging is a walk over matching paths (`merge_kernel`).
Dropout acts on the adapter's input only, and only when the apply is given a 'dropout' rng.
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
COLLECTION = "adapter"
_LETTERS = "abcdefgh"


def fan_in_uniform(fan_in: int):
  """PEFT's LoRA-A init: kaiming_uniform(a=sqrt(5)) = uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def adapter_variable(module: nn.Module, name: str, init, shape: Tuple[int, ...], axes, dtype):
  """A variable of the 'adapter' collection with logical axis names (None: replicated)."""
  boxed = nn.with_logical_partitioning(init, tuple(axes))
  return module.variable(COLLECTION, name, lambda: boxed(module.make_rng("params"), shape,
                                                         dtype)).value


def dropout(module: nn.Module, x: Array, rate: float) -> Array:
  """Inverted dropout on the adapter input, active only when a 'dropout' rng is supplied."""
  if not rate or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LoRA(nn.Module):
  """The low-rank update of one projection; returns only the delta, [..., out...]."""

  features: Tuple[int, ...]
  in_axes: Tuple[Any, ...]  # logical names of the contracted input axes
  out_axes: Tuple[Any, ...]  # logical names of the feature axes
  rank: int
  alpha: float
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    contract = len(self.in_axes)
    in_shape = tuple(x.shape[-contract:])
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    a = adapter_variable(self, "a", fan_in_uniform(fan_in), in_shape + (self.rank,),
                         tuple(self.in_axes) + (None,), self.param_dtype)
    b = adapter_variable(self, "b", nn.initializers.zeros, (self.rank,) + tuple(self.features),
                         (None,) + tuple(self.out_axes), self.param_dtype)
    ins, outs = _LETTERS[:contract], _LETTERS[contract:contract + len(self.features)]
    x = dropout(self, x.astype(self.dtype), self.dropout_rate)
    z = jnp.einsum(f"...{ins},{ins}r->...r", x, a.astype(self.dtype))
    y = jnp.einsum(f"...r,r{outs}->...{outs}", z, b.astype(self.dtype))
    return y * jnp.asarray(self.alpha / self.rank, self.dtype)


def merge_kernel(kernel: Array, a: Array, b: Array, alpha: float) -> Array:
  """kernel [in..., out...] + (alpha / r) * A B: the merged weight of one projection."""
  rank = a.shape[-1]
  delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  return (kernel.astype(jnp.float32) + (alpha / rank) * delta).astype(kernel.dtype)
