"""Building the policy a run trains: its config, its processor and its parameters.

`config.model.checkpoint` names a local HF directory (weights, tokenizer and image settings load
from it); otherwise `config.model.preset` picks a shape and the parameters start random, with the
tokenizer shipped in the package.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import flax.linen as nn

from jigsaw_jax.models import hf_io, mllm, presets
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.processing import Processor


def model_config(model: Any) -> ModelConfig:
  """ModelConfig from `config.model` (preset + dtype/remat/attention overrides, or checkpoint)."""
  overrides = dict(dtype=model.dtype, param_dtype=model.param_dtype, remat=bool(model.remat),
                   attention_impl=model.attention_impl)
  if model.checkpoint:
    return hf_io.model_config_from_hf(hf_io.read_config(model.checkpoint), **overrides)
  return presets.get_preset(model.preset, **overrides)


def processor(model: Any) -> Processor:
  return Processor.from_pretrained(model.checkpoint or None)


def abstract_params(cfg: ModelConfig):
  """Boxed abstract params (logical names kept) for sharding decisions; allocates nothing."""
  return mllm.abstract_params(cfg)


def initial_params(model: Any, cfg: ModelConfig, rng: jax.Array,
                   shardings: Optional[Any] = None) -> Any:
  """The run's starting parameters: the checkpoint's, or random ones for a preset, each created
  directly with its sharding when `shardings` is given."""
  if model.checkpoint:
    params, _ = hf_io.load_hf(model.checkpoint, cfg, shardings=shardings)
    return params
  inputs = mllm.dummy_inputs(cfg)
  grid = inputs.pop("image_grid_thw", None)
  module = mllm.VisionLanguageModel(cfg)
  init = lambda r: nn.unbox(module.init(r, **inputs, image_grid_thw=grid))
  return jax.jit(init, out_shardings=shardings)(rng)
