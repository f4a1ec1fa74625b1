"""Log-probabilities and entropies of completion tokens under a policy (GRPO's policy and KL
reference, SFT's likelihood): only the positions that predict completion tokens reach the LM head,
and rows that share a prompt can run it once (`shared_prompt_scores`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.rl.grpo import losses


def completion_scores(model: mllm.VisionLanguageModel, params, input_ids, attn_mask, positions,
                      pixel_values, completion, grid, temperature: float, *,
                      adapters_enabled: bool = True, rngs=None, with_aux: bool = False,
                      group: int = 1):
  """log p(completion token) and the entropy at each completion position, float32 [R, T].

  Logits are computed only at the T positions that predict completion tokens, so the [R, L+T, V]
  tensor over the whole sequence is never materialised. With adapters: `adapters_enabled=False`
  scores the base alone, `rngs={'dropout': key}` turns on adapter dropout, and `with_aux` also
  returns the mean MoE balance loss (0 without experts) as a third value.

  `group` > 1 says that rows g*G ... g*G + G-1 share one prompt (and its images), as
  `build_sequences` lays them out: the vision tower and the prompt then run once per distinct
  prompt (`shared_prompt_scores`), the same numbers up to float rounding.
  """
  if group > 1:
    return shared_prompt_scores(model, params, input_ids, attn_mask, positions, pixel_values,
                                completion, grid, temperature, group,
                                adapters_enabled=adapters_enabled, rngs=rngs, with_aux=with_aux)
  t = completion.shape[1]
  out = model.apply(params, input_ids, positions, attn_mask, pixel_values, grid or None,
                    return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled,
                    rngs=rngs, mutable=[adapters_lib.LOSSES] if with_aux else False)
  out, state = out if with_aux else (out, {})
  hidden = out.hidden[:, -t - 1:-1]
  logits = model.apply(params, hidden, method=lambda m, h: m.decoder.logits(h))
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores


def _first_of_group_patches(grid, rows: int, group: int):
  """(indices, grids) of the images of every group's first row: which patches of `pixel_values`
  (all rows' images, in row order) they are (None: equal images, a reshape picks them)."""
  per_row = len(grid) // rows
  firsts = [i for p in range(rows // group) for i in range(p * group * per_row,
                                                           p * group * per_row + per_row)]
  prompt_grid = tuple(grid[i] for i in firsts)
  sizes = [int(np.prod(g)) for g in grid]
  if len(set(sizes)) <= 1:
    return None, prompt_grid  # Equal images: a reshape picks them, which shards cleanly.
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in firsts])
  return index.astype(np.int32), prompt_grid


def shared_prompt_scores(model: mllm.VisionLanguageModel, params, input_ids, attn_mask,
                         positions, pixel_values, completion, grid, temperature: float,
                         group: int, *, adapters_enabled: bool = True, rngs=None,
                         with_aux: bool = False):
  """`completion_scores` with the G rows of a group sharing their prompt's forward pass.

  The prompt (first row of each group, images included) fills a KV cache, which the G rows of its
  group read as a shared prefix while the completion tokens but the last run after it, at the
  positions `build_sequences` gave them. The prompt's last hidden state
  predicts completion token 0, the completion's own hidden states the rest. Gradients reach the
  prompt through the shared prefix (summed over the group), so loss and grads are those of the
  unshared pass. Prompts (image tokens and instructions) are most of a GRPO batch's tokens, so
  this does close to G times less work.

  With MoE adapters the balance loss is sown once by the prompt pass and once by the completion
  pass and `balance_loss` averages the two Switch losses, where the unshared pass computes one
  over all positions (prompt rows counted G times): the regulariser differs slightly; log-probs,
  entropies and the policy loss do not.
  """
  rows, t = completion.shape
  length = input_ids.shape[1] - t
  prompts = rows // group
  first = lambda x, axis=0: jax.lax.index_in_dim(
      x.reshape(x.shape[:axis] + (prompts, group) + x.shape[axis + 1:]), 0, axis + 1, False)
  prompt_ids = first(input_ids)[:, :length]
  prompt_mask = first(attn_mask)[:, :length]
  prompt_positions = first(positions, positions.ndim - 2)[..., :length]  # M-RoPE: [3, R, L+T]
  prompt_pixels, prompt_grid = None, ()
  if grid:
    index, prompt_grid = _first_of_group_patches(grid, rows, group)
    if index is None:
      prompt_pixels = first(pixel_values.reshape(rows, -1, pixel_values.shape[-1]))
      prompt_pixels = prompt_pixels.reshape(-1, pixel_values.shape[-1])
    else:
      prompt_pixels = jnp.take(pixel_values, jnp.asarray(index), axis=0)

  def forward(m: mllm.VisionLanguageModel):
    # One apply for both passes: adapter dropout draws fresh masks for each, as in one pass.
    dtype = jnp.dtype(m.cfg.dtype)
    cache = decoder_lib.init_cache(m.cfg.text, prompts, length, dtype)
    out = m(prompt_ids, prompt_positions, prompt_mask, prompt_pixels, prompt_grid or None, cache,
            return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
    hidden = jnp.repeat(out.hidden[:, -1:], group, axis=0)
    if t > 1:
      # The prompt cache is the read-only prefix of its G rows (decoder.Cache 'prefix', as the
      # sampler decodes): no G copies of the prompt's keys, and its gradient sums over the group.
      tail_cache = dict(decoder_lib.init_cache(m.cfg.text, rows, t - 1, dtype),
                        prefix={"layers": out.cache["layers"], "mask": out.cache["mask"]})
      tail = m(completion[:, :-1], positions[..., length:length + t - 1],
               attn_mask[:, length:length + t - 1], cache=tail_cache,
               return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
      hidden = jnp.concatenate([hidden, tail.hidden], axis=1)
    return m.decoder.logits(hidden)

  out = model.apply(params, method=forward, rngs=rngs,
                    mutable=[adapters_lib.LOSSES] if with_aux else False)
  logits, state = out if with_aux else (out, {})
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores
