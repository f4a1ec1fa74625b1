"""Building the policy a run trains: its config, its processor and its parameters.

`config.model.checkpoint` names a local HF directory (weights, tokenizer and image settings load
from it); otherwise `config.model.preset` picks a shape and the parameters start random, with the
tokenizer shipped in the package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import flax.linen as nn

from jigsaw_jax.models import adapters, hf_io, mllm, presets
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.models.internvl import processing as internvl_processing
from jigsaw_jax.models.processing import Processor


def model_config(model: Any) -> ModelConfig:
  """ModelConfig from `config.model` (preset + dtype/remat/attention overrides, or checkpoint)."""
  overrides = dict(dtype=model.dtype, param_dtype=model.param_dtype, remat=bool(model.remat),
                   attention_impl=model.attention_impl)
  if model.checkpoint:
    return hf_io.model_config_from_hf(hf_io.read_config(model.checkpoint), **overrides)
  return presets.get_preset(model.preset, **overrides)


def processor(model: Any, cfg: Optional[ModelConfig] = None) -> Processor:
  """The checkpoint's own processor, or the shipped tokenizer with image settings that match the
  preset's vision tower (patch and merge sizes)."""
  cfg = cfg or model_config(model)
  if cfg.vision is not None and cfg.vision.kind == internvl_processing.KIND:
    return internvl_processing.processor_for(cfg, model.checkpoint)
  if model.checkpoint:
    return Processor.from_pretrained(model.checkpoint)
  from jigsaw_jax.models import tokenizer as tokenizer_lib
  from jigsaw_jax.models.processing import ImageProcessingConfig
  image = ImageProcessingConfig()
  if cfg.vision is not None:
    image = ImageProcessingConfig(patch_size=cfg.vision.patch_size,
                                  merge_size=cfg.vision.spatial_merge_size,
                                  temporal_patch_size=cfg.vision.temporal_patch_size)
  return Processor(tokenizer_lib.load_tokenizer(None), image)


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
  init = lambda r: mllm.apply_initializer_range(
      cfg, nn.unbox(module.init(r, **inputs, image_grid_thw=grid)))
  return jax.jit(init, out_shardings=shardings)(rng)


def adapter_config(config: Any) -> Optional[adapters.AdapterConfig]:
  """`config.adapter` as an AdapterConfig; None for kind 'none' or a config without the block."""
  return adapters.from_config(config.get("adapter"))


def attach_adapter(config: Any, model_cfg: ModelConfig, params: Any, rng: jax.Array
                   ) -> Tuple[ModelConfig, Any, Dict[str, Any]]:
  """(model_cfg, trainable, frozen) of a run.

  Without an adapter: the model as it is, every parameter trainable, nothing frozen. With
  `config.adapter.kind` set: the adapted ModelConfig, fresh adapter variables {'adapter': ...}
  (zero-effect at init) as the trainable part and the base variables frozen; the policy is
  `adapters.join(trainable, frozen)`.
  """
  adapter = adapter_config(config)
  if adapter is None:
    return model_cfg, params, {}
  cfg = dataclasses.replace(model_cfg, adapter=adapter)
  trainable = mllm.init_adapters(cfg, jax.random.fold_in(rng, 1))
  logging.info("Adapter %s: %d trainable parameters (base: %d, frozen).", adapter.kind,
               adapters.count_params(trainable), adapters.count_params(params))
  return cfg, trainable, dict(params)
