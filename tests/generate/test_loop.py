"""The decode loop on its own: stopping, padding, the mask, and where a hook's records go.

A scripted "model" whose next logits favour one token per (row, step), so every outcome is known
without a network.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.generate import loop
from jigsaw_jax.generate.hooks import GreedyHook

VOCAB, PAD, EOS, STEPS = 16, 0, 9, 6
# PLAN[r, s]: the token row r proposes at step s. Row 0 stops at step 2, row 1 at step 4, row 2
# never does.
PLAN = np.array([[3, 4, EOS, 5, 6, 7, 8],
                 [5, 6, 7, 8, EOS, 3, 4],
                 [1, 2, 3, 4, 5, 6, 7]], np.int32)


def _forward(token, cache):
  """The cache is the step counter; the logits one-hot PLAN[:, step]."""
  step = cache + 1
  return loop.ModelOutput(jax.nn.one_hot(jnp.asarray(PLAN)[:, step], VOCAB)), step


def _first():
  return loop.ModelOutput(jax.nn.one_hot(jnp.asarray(PLAN)[:, 0], VOCAB)), jnp.int32(0)


@dataclasses.dataclass(frozen=True)
class StepRecorder(GreedyHook):
  """Greedy, and records at each position the step it was chosen at and the chosen token."""

  def init_records(self, context, model_out, rows, steps):
    return {"step": jnp.full((rows, steps), -1, jnp.int32),
            "token": jnp.full((rows, steps), -1, jnp.int32)}

  def choose(self, context, step, model_out, done):
    token, _ = super().choose(context, step, model_out, done)
    return token, {"step": jnp.broadcast_to(step, token.shape), "token": token}


def _run(hook, stop_at_eos=True, steps=STEPS, eos=(EOS,)):
  model_out, cache = _first()
  return jax.jit(lambda: loop.decode(_forward, model_out, cache, hook, None, steps=steps,
                                     eos=jnp.asarray(eos, jnp.int32), pad_id=PAD,
                                     stop_at_eos=stop_at_eos))()


def test_rows_stop_at_their_first_eos_and_pad_after_it():
  state = _run(GreedyHook())
  tokens, mask = np.asarray(state.tokens), np.asarray(state.mask)
  np.testing.assert_array_equal(tokens[0], [3, 4, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(tokens[1], [5, 6, 7, 8, EOS, PAD])
  np.testing.assert_array_equal(tokens[2], PLAN[2, :STEPS])
  np.testing.assert_array_equal(mask.sum(1), [3, 5, 6])  # the EOS itself is in the completion
  assert np.all(mask == (np.arange(STEPS)[None] < mask.sum(1, keepdims=True)))
  np.testing.assert_array_equal(state.done, [True, True, False])
  assert int(state.step) == STEPS


def test_the_loop_ends_when_every_row_has_stopped():
  state = _run(GreedyHook(), steps=STEPS, eos=(EOS, 1))  # row 2 now stops at once
  assert int(state.step) == 5  # row 1's EOS at position 4 is the last token written
  assert int(state.cache) == 5  # ... and the forward pass ran once per position


def test_without_stop_at_eos_every_row_runs_every_step():
  state = _run(GreedyHook(), stop_at_eos=False)
  np.testing.assert_array_equal(state.tokens, PLAN[:, :STEPS])
  assert bool(np.all(state.mask))


def test_records_are_written_at_their_position_for_every_row():
  state = _run(StepRecorder())
  steps, tokens = np.asarray(state.records["step"]), np.asarray(state.records["token"])
  np.testing.assert_array_equal(steps, np.broadcast_to(np.arange(STEPS), steps.shape))
  # The hook sees what it chose; the loop writes pad in `tokens` for rows that have stopped.
  np.testing.assert_array_equal(np.where(state.mask, tokens, PAD), state.tokens)


def test_suppressed_tokens_are_never_chosen():
  state = _run(GreedyHook(suppress_ids=(4,)), stop_at_eos=False)
  assert not np.any(np.asarray(state.tokens) == 4)
  np.testing.assert_array_equal(state.tokens[:, 0], PLAN[:, 0])  # no 4 planned there
