"""The generate entry point: a jitted prefill over image + prompt, then the decode loop (loop.py).

Shaped for GRPO, where every prompt is sampled G times:

1. `rope_index` (host, numpy) gives the prompts' M-RoPE ids and per-row decode deltas.
2. Prefill (jit) runs the vision tower and the decoder ONCE per distinct prompt and fills a KV
   cache of the prompt's length.
3. Decode (jit) gives every row its own cache of max_new_tokens slots, with the prompt cache as
   the read-only prefix that the G rows of a group share (decoder.Cache 'prefix'): the prompt's
   keys are neither copied G times nor read G times per step, which was most of the decode time
   when they were (`share_prefill=False` prefills every row instead: same result, for checking).
   The last logits and the deltas are repeated G times along the batch.
4. Decode is the one loop of `loop.decode`, whose token hook is plain sampling (`SamplingHook`) by
   default; Proxy-RLHF's accept/reject and FastMem's greedy / contrastive decoding pass theirs.

`cache_layout="contiguous"` instead prefills a cache of prompt + max_new_tokens slots and repeats
it G times: Proxy-RLHF's and FastMem's decoders use it, so that their outputs stay bit for bit
what they were before they shared this loop (moving them onto the shared prefix is a speed change
to make with its own check). Several parameter
trees given as a tuple decode in lockstep, each on its own cache (FastMem+CD): the hook then
reads a tuple of `ModelOutput`s.

Shapes are static per (number of prompts, bucketed prompt length, image grids); the number of
distinct shapes compiled so far is reported by `compilations`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.generate import loop
from jigsaw_jax.generate.hooks import SamplingHook
from jigsaw_jax.generate.loop import ModelOutput, TokenHook
from jigsaw_jax.generate.sampling import SamplingConfig
from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import PromptBatch

CACHE_LAYOUTS = ("shared_prefix", "contiguous")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  max_new_tokens: int = 512
  group_size: int = 8  # G: samples per prompt, adjacent in the output
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: Tuple[int, ...] = ()  # a row stops at the first of these (included in its completion)
  pad_id: int = 0  # written after a row has stopped
  stop_at_eos: bool = True  # False forces max_new_tokens for every row (benchmarks)
  share_prefill: bool = True


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

  `hook` (default `SamplingHook(cfg.sampling)`) chooses each token; `tap_layer` makes the forward
  passes also return the residual stream entering that layer (ModelOutput.tapped).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, hook: Optional[TokenHook] = None,
               *, cache_layout: str = "shared_prefix", tap_layer: Optional[int] = None):
    if cache_layout not in CACHE_LAYOUTS:
      raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}; got {cache_layout!r}.")
    self.model_cfg = model_cfg
    self.cfg = cfg
    self.hook = hook or SamplingHook(cfg.sampling)
    self.cache_layout = cache_layout
    self.tap = tap_layer
    self.model = mllm.VisionLanguageModel(model_cfg)
    self._shapes = set()
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("grid", "cache_len"))
    # A contiguous cache is made by the prefill and dies in the decode: its buffers are reused.
    donate = ("cache",) if cache_layout == "contiguous" else ()
    self._decode = jax.jit(self._decode_impl, static_argnames=("hook",), donate_argnames=donate)

  @property
  def compilations(self) -> int:
    """Distinct input shapes seen so far (each compiles prefill and decode once)."""
    return len(self._shapes)

  # -- host side ---------------------------------------------------------------------------

  def _prepare(self, batch: PromptBatch, index: Optional[mllm.RopeIndex] = None) -> _Prompts:
    if index is None:
      index = mllm.rope_index(self.model_cfg, batch.input_ids, batch.image_grid_thw,
                              batch.attention_mask)
    grid = tuple(tuple(int(v) for v in g) for g in np.asarray(batch.image_grid_thw).reshape(-1, 3))
    pixel_values = np.asarray(batch.pixel_values, np.float32) if grid else None
    return _Prompts(np.asarray(batch.input_ids, np.int32), index.positions,
                    np.asarray(batch.attention_mask, np.int32), index.deltas, pixel_values, grid)

  def generate(self, params, batch: PromptBatch, rng: jax.Array, hook_params: Any = None,
               hook: Optional[TokenHook] = None,
               rope_index: Optional[mllm.RopeIndex] = None) -> Any:
    """`group_size` completions for each prompt row of `batch` (left-padded): a `Rollout` with
    the default hook, else what `hook.finish` makes. `params` is one variables tree, or a tuple
    of them that decode in lockstep; `hook_params` are the arrays the hook reads; `rope_index`
    is the batch's `mllm.rope_index` if the caller computed it already."""
    hook = hook or self.hook
    group = self.cfg.group_size
    if not self.cfg.share_prefill and group > 1:
      batch = repeat_prompts(batch, group, self.model_cfg.image_token_id)
      group, rope_index = 1, None
    prompts = self._prepare(batch, rope_index)
    rows, length = prompts.input_ids.shape
    self._shapes.add((rows, length, prompts.grid))
    contiguous = self.cache_layout == "contiguous"
    cache_len = length + self.cfg.max_new_tokens if contiguous else length
    streams = params if isinstance(params, tuple) else (params,)
    model_out, cache = zip(*[
        self._prefill(p, prompts.input_ids, prompts.positions, prompts.attn_mask,
                      prompts.pixel_values, grid=prompts.grid, cache_len=cache_len)
        for p in streams])
    if group > 1:  # the shared prefix stays one row per prompt; a contiguous cache is repeated
      repeat = lambda tree: jax.tree_util.tree_map(
          lambda x: jnp.repeat(x, group, axis=0) if x.ndim else x, tree)
      model_out = repeat(model_out)
      cache = repeat(cache) if contiguous else cache
    deltas = jnp.repeat(jnp.asarray(prompts.deltas), group)
    if not isinstance(params, tuple):
      model_out, cache = model_out[0], cache[0]
    result, _ = self._decode(params, hook_params, model_out, cache, deltas, rng, hook=hook)
    return result

  # -- jitted ------------------------------------------------------------------------------

  def _prefill_impl(self, params, input_ids, positions, attn_mask, pixel_values, *, grid,
                    cache_len: Optional[int] = None):
    """(ModelOutput at the last prompt position, the cache of `cache_len` slots, default the
    prompt's length)."""
    cache = decoder_lib.init_cache(self.model_cfg.text, input_ids.shape[0],
                                   cache_len or input_ids.shape[1],
                                   jnp.dtype(self.model_cfg.dtype))
    out = self.model.apply(params, input_ids, positions, attn_mask, pixel_values,
                           grid or None, cache, last_logits_only=True, tap_layer=self.tap)
    return self._model_output(out), out.cache

  def _model_output(self, out) -> ModelOutput:
    return ModelOutput(out.logits[:, -1], None if self.tap is None else out.tapped[:, -1])

  def _decode_impl(self, params, hook_params, model_out, cache, deltas, rng, *, hook):
    """(hook.finish(final state), the final cache if the layout is contiguous, else None)."""
    cfg = self.cfg
    lockstep = isinstance(params, tuple)
    streams = params if lockstep else (params,)
    caches = cache if lockstep else (cache,)
    rows = jax.tree_util.tree_leaves(model_out)[0].shape[0]
    steps = cfg.max_new_tokens
    if self.cache_layout == "shared_prefix":
      caches = tuple(self._with_prefix(c, rows, steps) for c in caches)

    def forward(token, caches):  # the loop carries the caches as a tuple, one per stream
      outs, new_caches = [], []
      for p, c in zip(streams, caches):
        out = self.model.apply(p, token[:, None], mllm.decode_positions(c, deltas),
                               jnp.ones((rows, 1), jnp.int32), cache=c, tap_layer=self.tap)
        outs.append(self._model_output(out))
        new_caches.append(out.cache)
      return (tuple(outs), tuple(new_caches)) if lockstep else (outs[0], tuple(new_caches))

    state = loop.decode(forward, model_out, caches, hook,
                        hook.prepare(hook_params, rng, rows, steps), steps=steps,
                        eos=jnp.asarray(cfg.eos_ids or (-1,), jnp.int32), pad_id=cfg.pad_id,
                        stop_at_eos=cfg.stop_at_eos)
    final = state.cache if lockstep else state.cache[0]
    return hook.finish(state), (final if self.cache_layout == "contiguous" else None)

  def _with_prefix(self, prompt_cache, rows: int, steps: int):
    """A cache of `steps` slots per row, with the prompt cache as its read-only shared prefix."""
    cache = decoder_lib.init_cache(self.model_cfg.text, rows, steps,
                                   prompt_cache["layers"][0]["k"].dtype)
    cache["prefix"] = {"layers": prompt_cache["layers"], "mask": prompt_cache["mask"]}
    return cache
