"""HF checkpoints in and out: a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory <-> our parameters.

One declarative name map (`weight_specs`) lists every tensor: its HF name, its path in our tree,
how it is laid out, and the HF shape the config implies. Import and export both walk that list, so
they cannot disagree. Tensors stream one at a time from safetensors (never a pickle) and are placed
with their target sharding as they arrive, so a 7B checkpoint never sits twice in memory.

HF layouts accepted on import: the original Qwen names (`model.layers.*`, `visual.*`, what
transformers' save_pretrained writes) and transformers' in-memory names (`model.language_model.*`,
`model.visual.*`). Export writes the original names, which every consumer reads.

Layouts ("kind" in the map):
  linear: HF [out, in] <-> ours [in..., out...], i.e. transpose, with the head axes of q/k/v/o
          (and the Conv3d patch embedding's (C, T, P, P)) split or merged by a reshape.
  copy:   same values; biases of q/k/v are reshaped [H*D] <-> [H, D].
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jigsaw_jax.models import mllm, vision_hf
from jigsaw_jax.models.config import ModelConfig, TextConfig
from jigsaw_jax.models.hf_config import (CheckpointError, PathLike, hf_config_from_model_config,
                                         model_config_from_hf, read_config)
from jigsaw_jax.models.qwen3_vl import hf as qwen3_vl_hf
from jigsaw_jax.models.internvl import hf_io as internvl_hf

Path = Tuple[str, ...]

# Files of a checkpoint directory that are not weights but that users of an export need.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "preprocessor_config.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  hf_name: str  # in the original Qwen layout
  path: Path  # inside params['params']
  kind: str  # 'linear' or 'copy'
  hf_shape: Tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# The name map.
# ---------------------------------------------------------------------------------------------


def decoder_weight_specs(t: TextConfig, prefix: Path = ("decoder",)) -> List[WeightSpec]:
  """The text decoder's tensors (HF Qwen2 / LLaMA names); `prefix` is the decoder's path."""
  e, q, kv, inter = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, \
      t.intermediate_size
  dec = tuple(prefix)
  specs = [WeightSpec("model.embed_tokens.weight", dec + ("embed_tokens", "embedding"), "copy",
                      (t.vocab_size, e))]
  for i in range(t.num_layers):
    hf, ours = f"model.layers.{i}.", dec + (f"layers_{i}",)
    attn = ours + ("self_attn",)
    for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
      specs.append(WeightSpec(f"{hf}self_attn.{name}.weight", attn + (name, "kernel"), "linear",
                              (out, e)))
      if t.qkv_bias:
        specs.append(WeightSpec(f"{hf}self_attn.{name}.bias", attn + (name, "bias"), "copy",
                                (out,)))
    specs.append(WeightSpec(f"{hf}self_attn.o_proj.weight", attn + ("o_proj", "kernel"), "linear",
                            (e, q)))
    if t.qk_norm:
      for name in ("q_norm", "k_norm"):
        specs.append(WeightSpec(f"{hf}self_attn.{name}.weight", attn + (name, "scale"), "copy",
                                (t.head_dim,)))
    for name, shape in (("gate_proj", (inter, e)), ("up_proj", (inter, e)),
                        ("down_proj", (e, inter))):
      specs.append(WeightSpec(f"{hf}mlp.{name}.weight", ours + ("mlp", name, "kernel"), "linear",
                              shape))
    for name in ("input_layernorm", "post_attention_layernorm"):
      specs.append(WeightSpec(f"{hf}{name}.weight", ours + (name, "scale"), "copy", (e,)))
  specs.append(WeightSpec("model.norm.weight", dec + ("norm", "scale"), "copy", (e,)))
  if not t.tie_word_embeddings:
    specs.append(WeightSpec("lm_head.weight", dec + ("lm_head",), "linear", (t.vocab_size, e)))
  return specs


def weight_specs(cfg: ModelConfig) -> List[WeightSpec]:
  """Every tensor of the model: decoder entries here, vision entries from vision_hf.hf_weight_map."""
  specs = decoder_weight_specs(cfg.text)
  if cfg.vision is not None and cfg.vision.kind == internvl_hf.KIND:
    return specs + [WeightSpec(*entry) for entry in internvl_hf.vision_weight_entries(cfg.vision)]
  if cfg.vision is not None and cfg.vision.kind == qwen3_vl_hf.MODEL_TYPE:
    specs += [WeightSpec("visual." + name, ("visual",) + path, kind, shape)
              for name, path, kind, shape in qwen3_vl_hf.vision_weight_map(cfg.vision)]
  elif cfg.vision is not None:
    shapes = vision_hf.hf_shapes(cfg.vision)
    for name, path, kind in vision_hf.hf_weight_map(cfg.vision):
      kind = "copy" if kind == "copy" else "linear"  # conv3d_as_linear is a linear + reshape.
      specs.append(WeightSpec("visual." + name, ("visual",) + tuple(path), kind,
                              tuple(shapes[name])))
  return specs


def canonical_name(hf_name: str) -> str:
  """transformers' in-memory names -> the original Qwen names used in the map."""
  for prefix, canonical in (("model.language_model.", "model."), ("model.visual.", "visual."),
                            *internvl_hf.CANONICAL_PREFIXES):
    if hf_name.startswith(prefix):
      return canonical + hf_name[len(prefix):]
  return hf_name


def export_name(cfg: ModelConfig, hf_name: str) -> str:
  """The name a tensor is written under: the layout transformers' save_pretrained writes."""
  if cfg.vision is not None and cfg.vision.kind == internvl_hf.KIND:
    return internvl_hf.export_name(hf_name)
  if cfg.vision is not None and cfg.vision.kind == qwen3_vl_hf.MODEL_TYPE:
    return qwen3_vl_hf.export_name(hf_name)
  return hf_name


def hf_to_ours(kind: str, value: np.ndarray, our_shape: Sequence[int]) -> np.ndarray:
  if kind == "linear":
    value = value.reshape(value.shape[0], -1).T
  return np.ascontiguousarray(value).reshape(our_shape)


def ours_to_hf(kind: str, value: np.ndarray, hf_shape: Sequence[int]) -> np.ndarray:
  if kind == "linear":
    value = value.reshape(-1, hf_shape[0]).T
  return np.ascontiguousarray(value).reshape(hf_shape)


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------


def _tensor_files(directory: pathlib.Path) -> List[pathlib.Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
      raise CheckpointError(f"model.safetensors.index.json in {str(directory)!r} names shards "
                            f"that are not there: {missing}. Copy the complete checkpoint.")
    return [directory / s for s in shards]
  single = directory / "model.safetensors"
  files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
  if not files:
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f" It has {pickles}: pickled PyTorch weights, which we never load (unpickling runs "
            "code). Re-save with transformers: model.save_pretrained(dir) writes safetensors."
            if pickles else "")
    raise CheckpointError(f"no *.safetensors weights in {str(directory)!r}.{hint}")
  return files


def _scan(files: Sequence[pathlib.Path]) -> Dict[str, Tuple[pathlib.Path, str, Tuple[int, ...]]]:
  """canonical name -> (file, name in file, shape), reading headers only."""
  found: Dict[str, Tuple[pathlib.Path, str, Tuple[int, ...]]] = {}
  for file in files:
    with safe_open(str(file), framework="numpy") as f:
      for key in f.keys():
        name = canonical_name(key)
        if name in found:
          raise CheckpointError(f"tensor {name} appears twice (as {found[name][1]} in "
                                f"{found[name][0].name} and as {key} in {file.name}).")
        found[name] = (file, key, tuple(f.get_slice(key).get_shape()))
  return found


def _get_path(tree: Mapping[str, Any], path: Path) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set_path(tree: Dict[str, Any], path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf(
    directory: PathLike,
    cfg: Optional[ModelConfig] = None,
    *,
    shardings: Optional[Any] = None,
    **overrides,
) -> Tuple[Dict[str, Any], ModelConfig]:
  """Loads a HF Qwen2-VL / Qwen2.5-VL directory into {'params': ...} in cfg.param_dtype.

  Args:
    directory: holds config.json and model.safetensors (or shards + model.safetensors.index.json).
    cfg: our config; by default read from config.json (with `overrides`, e.g. dtype='bfloat16').
    shardings: optional pytree like the returned params, of jax.sharding.Sharding; each tensor is
      device_put with its own as soon as it is read.
  Returns:
    (params, cfg).
  Raises:
    CheckpointError naming every missing, unexpected or mis-shaped tensor.
  """
  directory = pathlib.Path(directory)
  if cfg is None:
    cfg = model_config_from_hf(read_config(directory), **overrides)
  elif overrides:
    cfg = dataclasses.replace(cfg, **overrides)
  specs = weight_specs(cfg)
  found = _scan(_tensor_files(directory))
  abstract = nn.unbox(mllm.abstract_params(cfg))["params"]

  problems = []
  # Named as the checkpoint's own layout names them (Qwen3-VL's differ from the canonical ones).
  shown = (qwen3_vl_hf.export_name if cfg.vision is not None
           and cfg.vision.kind == qwen3_vl_hf.MODEL_TYPE else lambda name: name)
  expected = {s.hf_name for s in specs}
  tied_head = cfg.text.tie_word_embeddings and "lm_head.weight" in found
  for s in specs:
    if s.hf_name not in found:
      problems.append(f"missing tensor {shown(s.hf_name)} (shape {s.hf_shape}).")
    elif found[s.hf_name][2] != s.hf_shape:
      problems.append(f"tensor {shown(s.hf_name)} has shape {found[s.hf_name][2]}, expected "
                      f"{s.hf_shape}.")
  for name in sorted(set(found) - expected - ({"lm_head.weight"} if tied_head else set())):
    problems.append(f"unexpected tensor {found[name][1]} {found[name][2]}.")
  if problems:
    raise CheckpointError(
        f"checkpoint {str(directory)!r} does not match its config ({len(problems)} problem(s)):\n  "
        + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "") +
        "\nThe config.json and the weights must come from the same model: re-export the "
        "directory, or fix config.json so its sizes describe these tensors.")

  dtype = jnp.dtype(cfg.param_dtype)
  params: Dict[str, Any] = {}
  with contextlib.ExitStack() as stack:
    handles: Dict[pathlib.Path, Any] = {}

    def read(name: str) -> np.ndarray:
      file, key, _ = found[name]
      if file not in handles:
        handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
      return handles[file].get_tensor(key)

    for s in specs:
      target = _get_path(abstract, s.path)
      if target is None:
        raise AssertionError(f"name map entry {s.hf_name} -> {s.path} is not a model parameter.")
      value = hf_to_ours(s.kind, read(s.hf_name), target.shape).astype(dtype)
      sharding = _get_path(shardings, ("params",) + s.path) if shardings is not None else None
      _set_path(params, s.path, jax.device_put(value, sharding))
    if tied_head:
      embed = _get_path(params, ("decoder", "embed_tokens", "embedding"))
      if not np.array_equal(read("lm_head.weight").astype(dtype), _host(embed)):
        raise CheckpointError(
            "config.json says tie_word_embeddings=true but lm_head.weight differs from "
            "model.embed_tokens.weight. Set tie_word_embeddings to false in config.json.")
  missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
             if _get_path(params, tuple(k.key for k in p)) is None]
  if missing:
    raise AssertionError(f"the name map does not cover parameters {missing[:8]}.")
  return {"params": params}, cfg


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_tensors(params: Mapping[str, Any], cfg: ModelConfig,
               dtype: Optional[str] = None) -> Iterator[Tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor, one at a time, in map order."""
  tree = nn.unbox(params)
  tree = tree.get("params", tree)
  for s in weight_specs(cfg):
    value = _get_path(tree, s.path)
    if value is None:
      raise KeyError(f"params have no {'/'.join(s.path)} (HF tensor {s.hf_name}); were they "
                     "made for this config?")
    value = ours_to_hf(s.kind, _host(value), s.hf_shape)
    yield export_name(cfg, s.hf_name), value.astype(jnp.dtype(dtype)) if dtype else value


def save_hf(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    directory: PathLike,
    *,
    dtype: Optional[str] = None,
    max_shard_bytes: int = 5 * 2**30,
    copy_files_from: Optional[PathLike] = None,
) -> pathlib.Path:
  """Writes config.json + safetensors (sharded above `max_shard_bytes`) that transformers loads.

  Args:
    dtype: tensor dtype on disk ('bfloat16' for release); default: the params' own.
    copy_files_from: a checkpoint directory whose tokenizer/processor files are copied along, so
      the export is usable by itself.
  """
  directory = pathlib.Path(directory)
  write = jax.process_index() == 0
  if write:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), *directory.glob("model.safetensors.index.json")]:
      stale.unlink()  # A previous export's shards would otherwise mix with this one's.
  shard: Dict[str, np.ndarray] = {}
  shard_of: Dict[str, int] = {}  # tensor name -> shard number (0-based)
  num_shards, size, total, disk_dtype = 0, 0, 0, None

  def flush():  # Keeps host memory at one shard: a finished shard goes to disk at once.
    if write:
      save_file(shard, str(directory / f"shard-{num_shards}.tmp"), metadata={"format": "pt"})
    shard.clear()

  for name, value in hf_tensors(params, cfg, dtype):
    disk_dtype = disk_dtype or value.dtype
    if shard and size + value.nbytes > max_shard_bytes:
      flush()
      num_shards, size = num_shards + 1, 0
    shard[name], shard_of[name] = value, num_shards
    size += value.nbytes
    total += value.nbytes
  flush()
  num_shards += 1
  if not write:
    return directory
  names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" if num_shards > 1
           else "model.safetensors" for i in range(num_shards)]
  for i, name in enumerate(names):
    os.replace(directory / f"shard-{i}.tmp", directory / name)
  if num_shards > 1:
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total},
         "weight_map": {k: names[i] for k, i in shard_of.items()}}, indent=2))
  hf_config_from_model_config(cfg, np.dtype(disk_dtype).name).save_pretrained(str(directory))
  if copy_files_from is not None:
    for name in PROCESSOR_FILES:
      source = pathlib.Path(copy_files_from) / name
      if source.is_file():
        shutil.copy(source, directory / name)
  return directory
