"""Export a run's policy as a Hugging Face model directory: the `export` task.

    python -m jigsaw_jax.main --config=configs/export.py --config.restore.workdir=RUN --workdir=OUT

OUT becomes what `transformers` expects of a Qwen2.5-VL checkpoint: config.json, the weights as
safetensors (sharded above `export.max_shard_bytes`, with model.safetensors.index.json),
generation_config.json, the tokenizer with its chat template, and the image processor's
preprocessor_config.json, so `Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT)`,
`AutoTokenizer` and `AutoImageProcessor` (and `AutoProcessor` where torchvision is installed) load
it offline. LoRA adapters are folded into the base kernels first; MoE adapters and Proxy-RLHF
proxies change the model per token and are refused with what to do instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from absl import logging
import transformers

from jigsaw_jax.models import hf_io
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.processing import ImageProcessingConfig, Processor
from jigsaw_jax.runtime import restore as restore_lib

# transformers' Qwen2-VL image processor settings that are constants of the pipeline we reproduce.
_PIL_BICUBIC = 3


def image_processor_dict(image: ImageProcessingConfig, model_type: str) -> dict[str, Any]:
  """preprocessor_config.json for `image`, as Qwen2-VL / Qwen2.5-VL checkpoints ship it."""
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": ("Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl"
                          else "Qwen2VLProcessor"),
      "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
      "resample": _PIL_BICUBIC, "rescale_factor": image.rescale_factor,
      "image_mean": list(image.image_mean), "image_std": list(image.image_std),
      "patch_size": image.patch_size, "merge_size": image.merge_size,
      "temporal_patch_size": image.temporal_patch_size,
      "min_pixels": image.min_pixels, "max_pixels": image.max_pixels,
      "size": {"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
  }


def generation_config(model_cfg, processor: Processor) -> transformers.GenerationConfig:
  """Greedy decoding as our evaluator runs it: stop at the chat's end tokens, never emit the
  vision placeholder tokens."""
  return transformers.GenerationConfig(
      do_sample=False, eos_token_id=list(processor.special_ids.eos_ids),
      pad_token_id=processor.pad_token_id,
      suppress_tokens=[model_cfg.image_token_id, model_cfg.video_token_id,
                       model_cfg.vision_start_token_id, model_cfg.vision_end_token_id])


def write_processor(directory: pathlib.Path, processor: Processor, model_type: str) -> None:
  """Tokenizer (with its chat template) and image processor settings."""
  processor.tokenizer.save_pretrained(str(directory))
  template = processor.tokenizer.chat_template
  if template and not (directory / "chat_template.jinja").is_file():
    (directory / "chat_template.jinja").write_text(template)
  (directory / "preprocessor_config.json").write_text(json.dumps(
      image_processor_dict(processor.image_config, model_type), indent=2) + "\n")


def export(config, workdir: str) -> pathlib.Path:
  """Restores `config.restore.workdir` (latest, or `restore.step`) and writes `workdir` as an HF
  model directory; returns it."""
  source = config.restore.workdir
  if not source:
    raise ValueError("task=export needs --config.restore.workdir=RUN: the workdir of the run to "
                     "export.")
  found = restore_lib.run_params(source, config, step=config.restore.step or None)
  variables = restore_lib.merged_variables(found)
  model_cfg = dataclasses.replace(found.model_cfg, adapter=None)
  processor = policy_lib.processor(config.model, model_cfg)
  directory = pathlib.Path(workdir)
  hf_io.save_hf(variables, model_cfg, directory, dtype=config.export.dtype or None,
                max_shard_bytes=int(config.export.max_shard_bytes))
  write_processor(directory, processor, model_cfg.vision.kind)
  generation_config(model_cfg, processor).save_pretrained(str(directory))
  (directory / "jigsaw_jax_export.json").write_text(json.dumps(
      {"run": os.path.abspath(source), "step": found.step, "kind": found.kind}, indent=1) + "\n")
  logging.info("Exported step %d of %s (%s run) to %s.", found.step, source, found.kind,
               directory)
  print(f"Exported step {found.step} of {source} to {directory}: load it with "
        f"transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained({str(directory)!r}).")
  return directory
