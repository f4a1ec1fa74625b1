"""LLaMA-architecture GGUF files (llama.cpp's format) -> our TextDecoder, config and tokenizer.

A GGUF file carries everything a model needs: hyper-parameters and the tokenizer as metadata
(`llama.*`, `tokenizer.*` keys), and the weights, often quantised. We read it with the `gguf`
package (llama.cpp's own reader), dequantise every tensor to float32 and route it through two
declarative name maps: llama.cpp names -> HF LLaMA names (`GGUF_TO_HF` here), then HF names -> our
parameter tree (`hf_io.decoder_weight_specs`, the same map HF checkpoints use).

Two layout facts decide correctness:
  * `gguf.quants.dequantize` returns numpy arrays in HF's [out, in] layout: GGUF lists dimensions
    innermost first (`ne`), the reverse of numpy's shape, and the reader already reverses them.
  * llama.cpp's converter permutes the rows of Q and K within each head, from HF's `rotate_half`
    pairing (i, i + D/2) to the interleaved pairing (2i, 2i + 1) its rotary kernel uses.
    `unpermute_rotary` undoes that, so the weights run in our rotate_half RoPE unchanged.

The tokenizer (GPT-2 style byte-level BPE) is rebuilt from the metadata with the `tokenizers`
library and written as tokenizer.json + tokenizer_config.json for `transformers.AutoTokenizer`.

    cfg, params, tokenizer = load_gguf("model.gguf")
    TextDecoder(cfg).apply(params, ids, positions, mask).logits
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.models import hf_io
from jigsaw_jax.models.config import TextConfig
from jigsaw_jax.models.decoder import TextDecoder

PathLike = os.PathLike | str

# Bumped when the files written to the cache change, so stale ones are rebuilt.
_CACHE_FORMAT = 1


class GGUFError(ValueError):
  """A GGUF file we cannot import; the message says what was expected and what was found."""


# ---------------------------------------------------------------------------------------------
# The name map: llama.cpp tensor names -> HF LLaMA names.
# ---------------------------------------------------------------------------------------------

GGUF_TO_HF: Mapping[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the head is tied to the embedding
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Tensors stored permuted for interleaved rotary, and the TextConfig field giving their head count.
ROTARY_PERMUTED: Mapping[str, str] = {
    "blk.{i}.attn_q.weight": "num_heads",
    "blk.{i}.attn_k.weight": "num_kv_heads",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _template(gguf_name: str) -> Tuple[str, Optional[int]]:
  """'blk.3.attn_q.weight' -> ('blk.{i}.attn_q.weight', 3)."""
  m = _LAYER_RE.match(gguf_name)
  if m is None:
    return gguf_name, None
  return "blk.{i}." + gguf_name[m.end():], int(m.group(1))


def hf_name(gguf_name: str) -> Optional[str]:
  """The HF LLaMA name of a llama.cpp tensor name, or None if the map does not know it."""
  template, layer = _template(gguf_name)
  if template not in GGUF_TO_HF:
    return None
  return GGUF_TO_HF[template].format(i=layer)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF rotate_half rows -> llama.cpp's interleaved rows (what its converter does to Q and K).

  Per head, row r of the first half and row r of the second half (a rotary pair in HF's layout)
  become adjacent rows 2r and 2r+1.
  """
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `permute_rotary`: llama.cpp's interleaved Q/K rows -> HF rotate_half rows."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Reading the file.
# ---------------------------------------------------------------------------------------------


def open_gguf(path: PathLike):
  """A `gguf.GGUFReader` over `path` (memory-mapped: tensors are read when touched)."""
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {str(path)!r}.")
  try:
    return gguf.GGUFReader(str(path))
  except ValueError as e:  # The reader's message for a bad magic number or version.
    raise GGUFError(f"{str(path)!r} is not a readable GGUF file: {e}") from e


_REQUIRED = object()


def field(reader, key: str, default: Any = _REQUIRED) -> Any:
  """One metadata value as a Python object (str, int, float, bool or list)."""
  f = reader.fields.get(key)
  if f is None:
    if default is _REQUIRED:
      raise GGUFError(f"GGUF metadata has no {key!r}; a LLaMA model exported by llama.cpp's "
                      "convert_hf_to_gguf.py has it. Re-convert the model with a recent llama.cpp.")
    return default
  return f.contents()


def text_config_from_gguf(reader) -> TextConfig:
  """Our decoder config from the `llama.*` metadata: plain 1-D RoPE, no q/k/v bias, SwiGLU."""
  arch = field(reader, "general.architecture")
  if arch != "llama":
    raise GGUFError(f"general.architecture is {arch!r}; only 'llama' (LLaMA, SmolLM, Mistral-"
                    "style decoders) is supported.")
  scaling = field(reader, "llama.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise GGUFError(f"llama.rope.scaling.type is {scaling!r}; only unscaled RoPE is supported.")
  names = {t.name for t in reader.tensors}
  hidden = int(field(reader, "llama.embedding_length"))
  heads = int(field(reader, "llama.attention.head_count"))
  head_dim = int(field(reader, "llama.attention.key_length", hidden // heads))
  rotary = int(field(reader, "llama.rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise GGUFError(f"llama.rope.dimension_count is {rotary} but heads have {head_dim} dims; "
                    "partial rotary embeddings are not supported.")
  vocab = field(reader, "llama.vocab_size", None)
  if vocab is None:
    vocab = len(field(reader, "tokenizer.ggml.tokens"))
  return TextConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(field(reader, "llama.feed_forward_length")),
      num_layers=int(field(reader, "llama.block_count")), num_heads=heads,
      num_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)), head_dim=head_dim,
      rms_norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
      rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)), mrope_section=None,
      qkv_bias=False, tie_word_embeddings="output.weight" not in names, hidden_act="silu")


def dequantized_hf_tensors(reader, cfg: TextConfig) -> Iterator[Tuple[str, np.ndarray]]:
  """(HF name, float32 [out, in] array) per tensor, dequantised one at a time, Q/K un-permuted."""
  import gguf
  unknown = [t.name for t in reader.tensors if hf_name(t.name) is None]
  if unknown:
    raise GGUFError(f"GGUF tensors {unknown[:8]} are not in the LLaMA name map (GGUF_TO_HF); "
                    "this file is not a plain LLaMA-architecture model.")
  for t in reader.tensors:
    value = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    if not value.flags.writeable:  # Unquantised tensors are views of the read-only file mapping.
      value = value.copy()
    template, _ = _template(t.name)
    if template in ROTARY_PERMUTED:
      value = unpermute_rotary(value, getattr(cfg, ROTARY_PERMUTED[template]))
    yield hf_name(t.name), value


def _abstract_params(cfg: TextConfig) -> Dict[str, Any]:
  """Our parameter shapes for `cfg`, without allocating anything."""
  import flax.linen as nn
  one = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: TextDecoder(cfg).init(jax.random.key(0), one, one, one + 1))
  return nn.unbox(shapes)["params"]


def params_from_gguf(reader, cfg: TextConfig, param_dtype: str = "float32") -> Dict[str, Any]:
  """{'params': tree} for `TextDecoder(cfg)`, every tensor checked against the config's shapes."""
  specs = {s.hf_name: s for s in hf_io.decoder_weight_specs(cfg, prefix=())}
  abstract = _abstract_params(cfg)
  dtype = jnp.dtype(param_dtype)
  params: Dict[str, Any] = {}
  for name, value in dequantized_hf_tensors(reader, cfg):
    spec = specs.pop(name, None)
    if spec is None:
      raise GGUFError(f"tensor {name} is not a parameter of the decoder this file's metadata "
                      f"describes ({cfg}).")
    if value.shape != spec.hf_shape:
      raise GGUFError(f"tensor {name} has shape {value.shape}, but the metadata implies "
                      f"{spec.hf_shape}; the file's metadata and weights disagree.")
    target, parent = abstract, params
    for key in spec.path[:-1]:
      target, parent = target[key], parent.setdefault(key, {})
    target = target[spec.path[-1]]
    parent[spec.path[-1]] = jnp.asarray(hf_io.hf_to_ours(spec.kind, value, target.shape), dtype)
  if specs:
    raise GGUFError(f"the GGUF file lacks tensors {sorted(specs)[:8]} that its metadata implies.")
  return {"params": params}


# ---------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> whether digits are split one by one
# before GPT-2's regex split (llama.cpp: "\p{N}" first for the StarCoder family, SmolLM included).
_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "codeshell": True,
                   "gpt-2": False, "gpt2": False, "mpt": False, "olmo": False}
# llama.cpp token types (llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4


def backend_tokenizer_from_gguf(reader):
  """A `tokenizers.Tokenizer`: byte-level BPE from vocabulary and merges, plus added tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors

  kind = field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is "
                    "supported.")
  pre = field(reader, "tokenizer.ggml.pre", "gpt-2")
  if pre not in _PRE_TOKENIZERS:
    raise GGUFError(f"tokenizer.ggml.pre is {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}. "
                    "Add its split rule to _PRE_TOKENIZERS (see llama.cpp's llama-vocab.cpp).")
  tokens: List[str] = field(reader, "tokenizer.ggml.tokens")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFError(f"tokenizer.ggml.tokens has {len(tokens) - len(vocab)} duplicate tokens.")
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in field(reader, "tokenizer.ggml.merges")]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None,
                                        fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level])
                       if _PRE_TOKENIZERS[pre] else byte_level)
  tok.decoder = decoders.ByteLevel()
  bos_id = field(reader, "tokenizer.ggml.bos_token_id", None)
  if field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
    bos = tokens[bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  added = [tokenizers.AddedToken(tokens[i], special=t != _USER_DEFINED, normalized=False)
           for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
  tok.add_special_tokens([a for a in added if a.special])
  tok.add_tokens([a for a in added if not a.special])
  return tok


def tokenizer_config_from_gguf(reader) -> Dict[str, Any]:
  """tokenizer_config.json: special tokens by id from the metadata, and the chat template."""
  tokens = field(reader, "tokenizer.ggml.tokens")
  types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))

  def token(key):
    i = field(reader, f"tokenizer.ggml.{key}_token_id", None)
    return None if i is None else tokens[i]

  return {
      "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, nothing rebuilt
      # No add_bos_token: tokenizer.json's post-processor already adds BOS where the model wants it.
      "add_prefix_space": False,
      "bos_token": token("bos"),
      "eos_token": token("eos"),
      "pad_token": token("padding"),
      "unk_token": token("unknown"),
      "additional_special_tokens": [tokens[i] for i, t in enumerate(types) if t == _CONTROL],
      "chat_template": field(reader, "tokenizer.chat_template", None),
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(field(reader, "llama.context_length", 2048)),
  }


def write_tokenizer(reader, directory: PathLike) -> pathlib.Path:
  """Writes tokenizer.json + tokenizer_config.json into `directory` (atomically: a reader of the
  directory never sees half a file)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  files = {"tokenizer.json": backend_tokenizer_from_gguf(reader).to_str(),
           "tokenizer_config.json": json.dumps(tokenizer_config_from_gguf(reader), indent=2,
                                               ensure_ascii=False)}
  for name, text in files.items():
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, directory / name)
  return directory


def default_cache_dir() -> pathlib.Path:
  """$JIGSAW_JAX_CACHE, else $XDG_CACHE_HOME/jigsaw_jax, else ~/.cache/jigsaw_jax."""
  if os.environ.get("JIGSAW_JAX_CACHE"):
    return pathlib.Path(os.environ["JIGSAW_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jigsaw_jax"


def tokenizer_dir(path: PathLike, reader=None, cache_dir: Optional[PathLike] = None
                  ) -> pathlib.Path:
  """The tokenizer files of a GGUF, built once into a cache directory keyed by the file's name,
  size and modification time (so a replaced file gets a fresh tokenizer)."""
  path = pathlib.Path(path)
  stat = path.stat()
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  directory = root / "gguf_tokenizers" / (
      f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{_CACHE_FORMAT}")
  if not all((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
    reader = reader if reader is not None else open_gguf(path)
    try:
      write_tokenizer(reader, directory)
    except OSError:  # A read-only cache location: build a private copy instead.
      directory = write_tokenizer(reader, tempfile.mkdtemp(prefix="gguf_tokenizer_"))
  return directory


def load_tokenizer(path: PathLike, reader=None, cache_dir: Optional[PathLike] = None):
  """A `transformers` tokenizer (with chat template) rebuilt from the GGUF's metadata."""
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir(path, reader, cache_dir)))


# ---------------------------------------------------------------------------------------------
# Everything at once.
# ---------------------------------------------------------------------------------------------


def load_gguf(path: PathLike, *, param_dtype: str = "float32",
              cache_dir: Optional[PathLike] = None) -> Tuple[TextConfig, Dict[str, Any], Any]:
  """(TextConfig, {'params': ...}, tokenizer) from a LLaMA-architecture GGUF file.

  Args:
    path: the .gguf file.
    param_dtype: dtype of the returned parameters ('float32' or 'bfloat16').
    cache_dir: where the rebuilt tokenizer files go (default: `default_cache_dir()`).
  """
  reader = open_gguf(path)
  cfg = text_config_from_gguf(reader)
  params = params_from_gguf(reader, cfg, param_dtype)
  tokenizer = load_tokenizer(path, reader, cache_dir)
  if len(tokenizer) != cfg.vocab_size:
    raise GGUFError(f"the rebuilt tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                    f"has {cfg.vocab_size}.")
  return cfg, params, tokenizer
