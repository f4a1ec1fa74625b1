"""Log-probabilities and entropies of completion tokens under a policy (GRPO's policy and KL
reference, SFT's likelihood): only the positions that predict completion tokens reach the LM head,
and rows that share a prompt can run it once (`shared_prompt_scores`)."""

from __future__ import annotations

import jax.numpy as jnp

from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.sequences import SequenceBatch, expand_rows


def completion_scores(model: mllm.VisionLanguageModel, params, seq: SequenceBatch,
                      temperature: float, *, share_prompt: bool = False,
                      adapters_enabled: bool = True, rngs=None, with_aux: bool = False):
  """log p(completion token) and the entropy at each completion position, float32 [R, T].

  Logits are computed only at the T positions that predict completion tokens, so the [R, L+T, V]
  tensor over the whole sequence is never materialised. With adapters: `adapters_enabled=False`
  scores the base alone, `rngs={'dropout': key}` turns on adapter dropout, and `with_aux` also
  returns the mean MoE balance loss (0 without experts) as a third value.

  `share_prompt` (with `seq.group` > 1 and whole groups): the vision tower and each prompt run
  once for the G rows that continue it (`shared_prompt_scores`), the same numbers up to float
  rounding. Otherwise every row runs prompt + completion, its prompt gathered inside the jit.
  """
  if share_prompt and seq.group > 1 and seq.prompt_index is None:
    return shared_prompt_scores(model, params, seq, temperature,
                                adapters_enabled=adapters_enabled, rngs=rngs, with_aux=with_aux)
  t = seq.completion.shape[1]
  input_ids, attn_mask, positions, pixel_values, grid = expand_rows(seq)
  out = model.apply(params, input_ids, positions, attn_mask, pixel_values, grid or None,
                    return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled,
                    rngs=rngs, mutable=[adapters_lib.LOSSES] if with_aux else False)
  out, state = out if with_aux else (out, {})
  hidden = out.hidden[:, -t - 1:-1]
  logits = model.apply(params, hidden, method=lambda m, h: m.decoder.logits(h))
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, seq.completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores


def shared_prompt_scores(model: mllm.VisionLanguageModel, params, seq: SequenceBatch,
                         temperature: float, *, adapters_enabled: bool = True, rngs=None,
                         with_aux: bool = False):
  """`completion_scores` with the G rows of a group sharing their prompt's forward pass.

  The prompt (with its images) fills a KV cache, which the G rows of its group read as a shared
  prefix while the completion tokens but the last run after it, at the positions
  `build_sequences` gave them. The prompt's last hidden state predicts completion token 0, the
  completion's own hidden states the rest. Gradients reach the prompt through the shared prefix
  (summed over the group), so loss and grads are those of the unshared pass. Prompts (image
  tokens and instructions) are most of a GRPO batch's tokens, so this does close to G times less
  work.

  With MoE adapters the balance loss is sown once by the prompt pass and once by the completion
  pass and `balance_loss` averages the two Switch losses, where the unshared pass computes one
  over all positions (prompt rows counted G times): the regulariser differs slightly; log-probs,
  entropies and the policy loss do not.
  """
  completion, group = seq.completion, seq.group
  rows, t = completion.shape
  length, prompts = seq.prompt_length, seq.prompts
  prompt_pixels = seq.pixel_values if seq.grid else None

  def forward(m: mllm.VisionLanguageModel):
    # One apply for both passes: adapter dropout draws fresh masks for each, as in one pass.
    dtype = jnp.dtype(m.cfg.dtype)
    cache = decoder_lib.init_cache(m.cfg.text, prompts, length, dtype)
    out = m(seq.prompt_ids, seq.prompt_positions, seq.prompt_mask, prompt_pixels,
            seq.grid or None, cache,
            return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
    hidden = jnp.repeat(out.hidden[:, -1:], group, axis=0)
    if t > 1:
      # The prompt cache is the read-only prefix of its G rows (decoder.Cache 'prefix', as the
      # sampler decodes): no G copies of the prompt's keys, and its gradient sums over the group.
      tail_cache = dict(decoder_lib.init_cache(m.cfg.text, rows, t - 1, dtype),
                        prefix={"layers": out.cache["layers"], "mask": out.cache["mask"]})
      tail = m(completion[:, :-1], seq.completion_positions[..., :t - 1],
               seq.completion_mask[:, :t - 1].astype(jnp.int32), cache=tail_cache,
               return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
      hidden = jnp.concatenate([hidden, tail.hidden], axis=1)
    return m.decoder.logits(hidden)

  out = model.apply(params, method=forward, rngs=rngs,
                    mutable=[adapters_lib.LOSSES] if with_aux else False)
  logits, state = out if with_aux else (out, {})
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores
