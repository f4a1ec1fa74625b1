"""The decode loop: one `lax.while_loop` over positions, the token choice left to a hook.

Every decoder of the project runs this loop (the rollout sampler, Proxy-RLHF's accept/reject,
FastMem's greedy and contrastive decoding, the text-LM greedy decoder). What differs between them
is only

* `forward(token, cache) -> (model_out, cache)`: one step of the model(s), the caller's; and
* the `TokenHook`: how a token is chosen from `model_out`, and what is recorded beside it.

A step, for every row: the hook picks a token; a row that has stopped writes `pad_id` instead;
a row stops at its first token in `eos` (which it keeps) when `stop_at_eos`; then the forward pass
reads the tokens. The loop ends when every row has stopped or after `steps` positions.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Tuple

import flax.struct
import jax
import jax.numpy as jnp


class ModelOutput(NamedTuple):
  """What one forward pass leaves for the hook at the last position of each row."""

  logits: jax.Array  # [B, V] next-token logits
  tapped: Optional[jax.Array] = None  # [B, E]: the residual stream entering the tap layer


@flax.struct.dataclass
class DecodeState:
  """The loop's carry. B rows, T = steps positions."""

  step: jax.Array  # int32 []: the position written next, 0 ... T
  # ModelOutput for the next position, or a tuple of them when several models decode in lockstep
  # (FastMem+CD: the memorised and the original weights).
  model_out: Any
  cache: Any  # the KV cache(s) that `forward` reads and extends
  tokens: jax.Array  # int32 [B, T]: the chosen tokens; pad_id after a row has stopped
  mask: jax.Array  # bool [B, T]: completion tokens, up to and including a row's first EOS
  done: jax.Array  # bool [B]: rows that have stopped
  records: Any  # the hook's per-position records: a pytree of [B, T, ...] arrays


class TokenHook(Protocol):
  """The token choice of a decoder. All methods run inside the jitted decode.

  `prepare` derives, once before the loop, what every step reads (per-row PRNG keys, the hook's
  own parameters); `choose` returns the token of each row [B] and this position's record (a
  pytree of [B, ...] arrays, written at [:, step] of the buffers `init_records` made). A hook
  must be hashable (it is a static argument of the jit): its arrays come in as `hook_params`.
  """

  def prepare(self, hook_params: Any, rng: jax.Array, rows: int, steps: int) -> Any:
    ...

  def init_records(self, context: Any, model_out: Any, rows: int, steps: int) -> Any:
    ...

  def choose(self, context: Any, step: jax.Array, model_out: Any,
             done: jax.Array) -> Tuple[jax.Array, Any]:
    ...

  def finish(self, state: DecodeState) -> Any:
    """The decoder's result from the final state (a Rollout, a ProxyRollout, ...)."""
    ...


Forward = Callable[[jax.Array, Any], Tuple[Any, Any]]


def decode(forward: Forward, model_out: Any, cache: Any, hook: TokenHook, context: Any, *,
           steps: int, eos: jax.Array, pad_id, stop_at_eos: bool = True) -> DecodeState:
  """Runs the loop from the prompt's last `model_out` and `cache`; returns the final state.

  Args:
    forward: one decode step of the model(s): (tokens int32 [B], cache) -> (model_out, cache).
    model_out: the prefill's output at the last prompt position (ModelOutput or a tuple).
    cache: the KV cache(s) after the prefill.
    hook: the token choice; `context` is what its `prepare` returned.
    steps: max_new_tokens.
    eos: int32 [E] stop tokens ([-1] for none).
    pad_id: written after a row has stopped.
    stop_at_eos: False runs every row for `steps` positions (benchmarks).
  """
  rows = jax.tree_util.tree_leaves(model_out)[0].shape[0]

  def unfinished(state: DecodeState):
    return (state.step < steps) & ~jnp.all(state.done)

  def step(state: DecodeState) -> DecodeState:
    chosen, record = hook.choose(context, state.step, state.model_out, state.done)
    token = jnp.where(state.done, pad_id, chosen)
    records = jax.tree_util.tree_map(lambda buffer, value: buffer.at[:, state.step].set(value),
                                     state.records, record)
    done = state.done | jnp.isin(token, eos) if stop_at_eos else state.done
    model_out, cache = forward(token, state.cache)
    return DecodeState(step=state.step + 1, model_out=model_out, cache=cache,
                       tokens=state.tokens.at[:, state.step].set(token),
                       mask=state.mask.at[:, state.step].set(~state.done), done=done,
                       records=records)

  init = DecodeState(step=jnp.int32(0), model_out=model_out, cache=cache,
                     tokens=jnp.full((rows, steps), pad_id, jnp.int32),
                     mask=jnp.zeros((rows, steps), bool), done=jnp.zeros((rows,), bool),
                     records=hook.init_records(context, model_out, rows, steps))
  return jax.lax.while_loop(unfinished, step, init)
