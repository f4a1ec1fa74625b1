"""Tokenizers for the policy: a checkpoint's own, or the tiny one shipped in the package.

Real checkpoints (Qwen2-VL, Qwen2.5-VL) carry their tokenizer files; we load them with
`transformers.AutoTokenizer` so that the text side is exactly what the PyTorch model saw. CPU
presets use `assets/tokenizer_tiny`: a 1024-token byte-level BPE with Qwen2-VL's special tokens and
chat template, so that tiny models stay tiny while prompts keep Qwen's structure
(`build_tiny_tokenizer.py` rebuilds it).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
from typing import Optional, Tuple, Union

import transformers

PathLike = Union[str, os.PathLike]

# Qwen2-VL / Qwen2.5-VL added tokens in id order (they follow the BPE vocabulary, from id 151643 in
# Qwen's tokenizer). The flag says whether the token is "special" (dropped by
# `decode(skip_special_tokens=True)`); tool-call and fill-in-the-middle tokens are not.
QWEN2_VL_ADDED_TOKENS: Tuple[Tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The chat template of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (tokenizer_config.json and
# chat_template.json of both): a default "You are a helpful assistant." system turn unless the first
# message is a system message, and one <|vision_start|><|image_pad|><|vision_end|> per image item.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY_TOKENIZER_DIR = "assets/tokenizer_tiny"
# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """The ids the model and sampler need, read from a tokenizer rather than hard-coded.

  Qwen's real ids (151643...) and the tiny tokenizer's (~2k) differ; presets and the sampler take
  them from here so the same code serves both.
  """

  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  pad: int

  @property
  def eos_ids(self) -> Tuple[int, ...]:
    """Generation stops at either: Qwen-VL instruct's generation_config lists both."""
    return (self.im_end, self.endoftext)


def tiny_tokenizer_path() -> pathlib.Path:
  """The directory of the shipped tiny tokenizer (works from a checkout and when installed)."""
  try:
    path = pathlib.Path(str(importlib.resources.files("jigsaw_jax").joinpath(TINY_TOKENIZER_DIR)))
  except (ModuleNotFoundError, TypeError):
    path = None
  if path is None or not path.is_dir():
    path = pathlib.Path(__file__).resolve().parent.parent / TINY_TOKENIZER_DIR
  return path


def load_tokenizer(path: Optional[PathLike] = None) -> transformers.PreTrainedTokenizerBase:
  """Loads a checkpoint's tokenizer from a local directory, or the tiny one when `path` is None.

  Nothing is downloaded: `path` must be a directory that holds tokenizer files.
  """
  directory = tiny_tokenizer_path() if path is None else pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"Tokenizer directory {str(directory)!r} does not exist. Expected a local checkpoint "
        "directory holding tokenizer.json (for example a downloaded Qwen2.5-VL-3B-Instruct); "
        "set the config's tokenizer path to it, or leave it empty for the tiny tokenizer.")
  if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
    found = sorted(p.name for p in directory.iterdir())[:20]
    raise FileNotFoundError(
        f"No tokenizer files in {str(directory)!r}: expected one of {list(_TOKENIZER_FILES)} "
        f"(plus tokenizer_config.json), found {found}. Copy the checkpoint's tokenizer files "
        "into this directory or point the config at the directory that has them.")
  return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _token_id(tokenizer: transformers.PreTrainedTokenizerBase, token: str) -> int:
  token_id = tokenizer.convert_tokens_to_ids(token)
  if token_id is None or token_id == tokenizer.unk_token_id or not isinstance(token_id, int):
    raise ValueError(
        f"The tokenizer {tokenizer.name_or_path!r} has no token {token!r}; a Qwen-VL policy needs "
        f"Qwen2-VL's special tokens {[t for t, _ in QWEN2_VL_ADDED_TOKENS[:14]]}. Use a "
        "Qwen2-VL or Qwen2.5-VL tokenizer, or the tiny one (load_tokenizer(None)).")
  return token_id


def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> SpecialTokenIds:
  """Reads the ids of Qwen-VL's structural tokens; raises if the tokenizer lacks any of them."""
  ids = {
      field.name: _token_id(tokenizer, f"<|{field.name}|>")
      for field in dataclasses.fields(SpecialTokenIds) if field.name != "pad"
  }
  pad = tokenizer.pad_token_id
  return SpecialTokenIds(**ids, pad=ids["endoftext"] if pad is None else pad)
