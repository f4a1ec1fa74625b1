"""The rollout engine: a jitted prefill over image + prompt, then a jitted decode loop.

Shaped for GRPO, where every prompt is sampled G times:

1. `rope_index` (host, numpy) gives the prompts' M-RoPE ids and per-row decode deltas.
2. Prefill (jit) runs the vision tower and the decoder ONCE per distinct prompt and fills a KV
   cache of the prompt's length.
3. Decode (jit) gives every row its own cache of max_new_tokens slots, with the prompt cache as
   the read-only prefix that the G rows of a group share (decoder.Cache 'prefix'): the prompt's
   keys are neither copied G times nor read G times per step, which was most of the decode time
   when they were (`share_prefill=False` prefills every row instead: same result, for checking).
   The last logits and the deltas are repeated G times along the batch.
4. Decode is one `lax.while_loop`: sample a token per row with its own key, write it, stop a row
   at its first EOS, and stop the loop when every row has stopped or after max_new_tokens.

Shapes are static per (number of prompts, bucketed prompt length, image grids); the number of
distinct shapes compiled so far is reported by `compilations`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch
from jigsaw_jax.rollout.sampling import SamplingConfig, sample_tokens


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  max_new_tokens: int = 512
  group_size: int = 8  # G: samples per prompt, adjacent in the output
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: Tuple[int, ...] = ()  # a row stops at the first of these (included in its completion)
  pad_id: int = 0  # written after a row has stopped
  stop_at_eos: bool = True  # False forces max_new_tokens for every row (benchmarks)
  share_prefill: bool = True


class Rollout(NamedTuple):
  """G adjacent completions per prompt: row p*G + g is sample g of prompt p."""

  tokens: jax.Array  # int32 [B, max_new_tokens]; pad after the first EOS
  logprobs: jax.Array  # float32 [B, max_new_tokens]: log softmax(logits / T) at each token
  mask: jax.Array  # bool [B, max_new_tokens]: completion tokens up to and including the first EOS
  lengths: jax.Array  # int32 [B]


class _Prompts(NamedTuple):
  input_ids: np.ndarray
  positions: np.ndarray
  attn_mask: np.ndarray
  deltas: np.ndarray
  pixel_values: np.ndarray
  grid: Tuple[Tuple[int, int, int], ...]


def repeat_prompts(batch: PromptBatch, times: int, image_token_id: int) -> PromptBatch:
  """Each prompt row (and its images) repeated `times` times adjacently."""
  grids = np.asarray(batch.image_grid_thw).reshape(-1, 3)
  sizes = np.prod(grids, axis=-1)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  image_rows = []  # which images belong to each row, in order
  next_image = 0
  for ids in np.asarray(batch.input_ids):
    is_pad = (ids == image_token_id).astype(np.int8)
    runs = int(np.sum(np.diff(np.concatenate([[0], is_pad])) == 1))
    image_rows.append(list(range(next_image, next_image + runs)))
    next_image += runs
  pixel_rows, grid_rows = [], []
  for rows in image_rows:
    for _ in range(times):
      for i in rows:
        pixel_rows.append(np.asarray(batch.pixel_values)[starts[i]:starts[i + 1]])
        grid_rows.append(grids[i])
  return PromptBatch(
      input_ids=np.repeat(batch.input_ids, times, axis=0),
      attention_mask=np.repeat(batch.attention_mask, times, axis=0),
      pixel_values=(np.concatenate(pixel_rows) if pixel_rows
                    else np.zeros((0,) + np.shape(batch.pixel_values)[1:], np.float32)),
      image_grid_thw=np.asarray(grid_rows, np.int32).reshape(-1, 3))


class Sampler:
  """Generates G completions per prompt with a KV cache.

      sampler = Sampler(model_cfg, RolloutConfig(max_new_tokens=64, group_size=8, eos_ids=...))
      rollout = sampler.generate(params, prompt_batch, jax.random.key(0))
  """

  def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig):
    self.model_cfg = model_cfg
    self.cfg = cfg
    self.model = mllm.VisionLanguageModel(model_cfg)
    self._shapes = set()
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("grid",))
    self._decode = jax.jit(self._decode_impl)

  @property
  def compilations(self) -> int:
    """Distinct input shapes seen so far (each compiles prefill and decode once)."""
    return len(self._shapes)

  # -- host side ---------------------------------------------------------------------------

  def _prepare(self, batch: PromptBatch, index=None) -> _Prompts:
    if index is None:
      index = mllm.rope_index(self.model_cfg, batch.input_ids, batch.image_grid_thw,
                              batch.attention_mask)
    grid = tuple(tuple(int(v) for v in g) for g in np.asarray(batch.image_grid_thw).reshape(-1, 3))
    pixel_values = np.asarray(batch.pixel_values, np.float32) if grid else None
    return _Prompts(np.asarray(batch.input_ids, np.int32), index.positions,
                    np.asarray(batch.attention_mask, np.int32), index.deltas, pixel_values, grid)

  def generate(self, params, batch: PromptBatch, rng: jax.Array,
               rope_index: Optional[mllm.RopeIndex] = None) -> Rollout:
    """Samples `group_size` completions for each prompt row of `batch` (left-padded).
    `rope_index`: the batch's `mllm.rope_index`, if the caller computed it already."""
    group = self.cfg.group_size
    if not self.cfg.share_prefill and group > 1:
      batch = repeat_prompts(batch, group, self.model_cfg.image_token_id)
      group, rope_index = 1, None
    prompts = self._prepare(batch, rope_index)
    rows, length = prompts.input_ids.shape
    self._shapes.add((rows, length, prompts.grid))
    logits, prompt_cache = self._prefill(params, prompts.input_ids, prompts.positions,
                                         prompts.attn_mask, prompts.pixel_values,
                                         grid=prompts.grid)
    logits = jnp.repeat(logits, group, axis=0)
    deltas = jnp.repeat(jnp.asarray(prompts.deltas), group)
    return self._decode(params, logits, prompt_cache, deltas, rng)

  # -- jitted ------------------------------------------------------------------------------

  def _prefill_impl(self, params, input_ids, positions, attn_mask, pixel_values, *, grid):
    cache = decoder_lib.init_cache(self.model_cfg.text, input_ids.shape[0], input_ids.shape[1],
                                   jnp.dtype(self.model_cfg.dtype))
    out = self.model.apply(params, input_ids, positions, attn_mask, pixel_values,
                           grid or None, cache, last_logits_only=True)
    return out.logits[:, -1], out.cache

  def _decode_impl(self, params, logits, prompt_cache, deltas, rng):
    cfg = self.cfg
    rows = logits.shape[0]
    steps = cfg.max_new_tokens
    cache = decoder_lib.init_cache(self.model_cfg.text, rows, steps,
                                   prompt_cache["layers"][0]["k"].dtype)
    cache["prefix"] = {"layers": prompt_cache["layers"], "mask": prompt_cache["mask"]}
    row_keys = jax.random.split(rng, rows)
    # Every step's key, fold_in(row key, step), made before the loop: a threefry loop fewer
    # per step.
    step_keys = jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(
        jnp.arange(steps)))(row_keys)  # [rows, steps]
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def cond(state):
      step, _, _, _, _, done, _ = state
      return (step < steps) & ~jnp.all(done)

    def body(state):
      step, logits, cache, tokens, logprobs, done, mask = state
      token, logprob = sample_tokens(logits, step_keys[:, step], cfg.sampling)
      token = jnp.where(done, cfg.pad_id, token)
      tokens = tokens.at[:, step].set(token)
      logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
      mask = mask.at[:, step].set(~done)
      if cfg.stop_at_eos:
        done = done | jnp.isin(token, eos)
      positions = mllm.decode_positions(cache, deltas)
      out = self.model.apply(params, token[:, None], positions, jnp.ones((rows, 1), jnp.int32),
                             cache=cache)
      return step + 1, out.logits[:, -1], out.cache, tokens, logprobs, done, mask

    init = (jnp.int32(0), logits, cache, jnp.full((rows, steps), cfg.pad_id, jnp.int32),
            jnp.zeros((rows, steps), jnp.float32), jnp.zeros((rows,), bool),
            jnp.zeros((rows, steps), bool))
    _, _, _, tokens, logprobs, _, mask = jax.lax.while_loop(cond, body, init)
    return Rollout(tokens, logprobs, mask, mask.sum(-1).astype(jnp.int32))
