r"""Builds the tiny tokenizer shipped in `jigsaw_jax/assets/tokenizer_tiny`.

Why a tokenizer of our own: Qwen's 151k-token vocabulary would make the embedding table of a CPU
preset larger than the rest of the model. This one is trained on a small deterministic corpus of
the project's text (jigsaw prompts, answers, thinking traces, short image descriptions) with the
same pipeline as Qwen2's tokenizer (NFC, Qwen's split regex, so every digit is its own token,
byte-level BPE), then Qwen2-VL's added tokens in Qwen's order and its instruct chat template.

Rebuild (byte-for-byte reproducible for a given `tokenizers` version):

  python -m jigsaw_jax.models.build_tiny_tokenizer [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import string
from typing import Iterator, List

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from jigsaw_jax.models import tokenizer as tokenizer_lib

# BPE tokens (256 bytes + merges); Qwen's added tokens follow, so len(tokenizer) == 1024: enough
# for every word of the prompts to be one token, small enough that the embedding stays tiny.
BPE_VOCAB_SIZE = 1024 - len(tokenizer_lib.QWEN2_VL_ADDED_TOKENS)
# Qwen2's pre-tokenizer split: contractions, letters (with one leading non-letter), single digits,
# punctuation runs, newlines, spaces.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED = 20250529  # Jigsaw-R1's arXiv date; any fixed number would do.

_OBJECTS = (
    "sky", "cloud", "tree", "grass", "road", "street", "building", "house", "window", "door",
    "car", "bus", "truck", "train", "bicycle", "motorcycle", "boat", "airplane", "person", "man",
    "woman", "child", "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "giraffe", "zebra",
    "table", "chair", "bench", "bed", "couch", "plate", "cup", "bottle", "pizza", "cake", "banana",
    "apple", "sandwich", "laptop", "phone", "book", "clock", "umbrella", "kite", "ball", "water",
    "beach", "mountain", "snow", "field", "fence", "wall", "floor", "sign", "light", "shadow",
    "rocket", "coffee", "flower", "face", "hat", "shirt", "hand", "head", "leg", "wheel", "roof")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "brown", "grey", "orange", "pink",
            "purple", "dark", "bright", "light")
_PLACES = ("top", "bottom", "left", "right", "middle", "centre", "center", "corner", "edge",
           "upper half", "lower half", "background", "foreground")
_RELATIONS_1ROW = ("directly to the left of", "directly to the right of")
_RELATIONS_1COL = ("directly above", "directly below")
_RELATIONS_GRID = ("directly to the left of", "directly to the right of", "directly above",
                   "directly below", "on the upper left of", "on the upper right of",
                   "on the lower left of", "on the lower right of")
_COMMON_WORDS = tuple((
    "the a an and or but if then so because while when where what which who how why not no yes "
    "is are was were be been being have has had do does did can could will would should may might "
    "must this that these those there here it its they them their we our you your he she his her "
    "i me my of in on at to from with without into onto over under between through about after "
    "before during near far inside outside up down out off again once more most less few many much "
    "some any each every all both other another same different new old big small large little long "
    "short high low good bad right wrong true false first second third last next previous "
    "only also "
    "very just still even already almost about image picture photo view scene part piece patch "
    "grid row column position order index number answer question choice option task puzzle step "
    "look see show find check compare match place move put keep give take make think know seem "
    "appear belong contain continue connect fit line border side half whole area region shape "
    "colour color texture pattern object people animal vehicle food sport indoor outdoor day night"
).split())
_REASONING = (
    "The {o} in patch {i} continues into patch {j}, so they should be next to each other.",
    "Patch {i} shows the {c} {o}, which usually appears at the {p} of the image.",
    "The edges of patch {i} and patch {j} match: the {o} lines up across the border.",
    "Looking at the {p} of patch {i}, I can see part of a {c} {o}.",
    "Since the {o} is cut at the {p} edge, patch {i} must be placed before patch {j}.",
    "Therefore, the patch currently at position {i} belongs at position {j}.",
    "Let me check the colours: patch {i} is mostly {c}, while patch {j} contains the {o}.",
    "First, I compare the borders. Then, I check whether the {o} is continuous.",
    "This means the original order is {i} then {j}.",
    "Wait, that does not fit. Let me reconsider the position of the {o}.",
    "The horizon is straight between patch {i} and patch {j}, which confirms the answer.",
    "I am confident that patch {i} is {r} patch {j}.",
)
_GENERAL = (
    "Describe the image in one sentence.",
    "How many {o}s are in the image?",
    "Which object is closer to the camera, the {o} or the {o2}?",
    "Is the {o} to the left or to the right of the {o2}?",
    "What colour is the {o}? Answer with a single word.",
    "Count the objects and give the number as a single digit.",
    "The answer is {d}.",
    "There are {d} {o}s in the {p} of the picture.",
    "A {c} {o} next to a {c2} {o2} in the {p}.",
    "The {o} is above the {o2} and below the {o3}.",
    "Select the correct answer from the options below.",
    "Please answer the question based on the image.",
    "Think step by step, and then give the final answer.",
    "The image shows a {c} {o} and a {o2}.",
)


def _grid(m: int, n: int, values: List[int]) -> str:
  return "\n".join(" ".join(str(values[i * n + j]) for j in range(n)) for i in range(m))


def _ends(m: int, n: int) -> tuple:
  if m == 1:
    return "left", "right"
  if n == 1:
    return "top", "bottom"
  return "top-left", "bottom-right"


def _jigsaw_prompt(m: int, n: int, pair: bool, think: bool, mask: bool, rng: random.Random) -> str:
  """Jigsaw-R1-style user text (task, index grid, question, instruction)."""
  first, last = _ends(m, n)
  text = (f"The input image is divided into {m}x{n} patches that have been randomly permuted from "
          f"their original positions. Your task is to solve this {m}x{n} jigsaw puzzle and "
          "reconstruct the original image.")
  if mask:
    text += " To increase the task difficulty, the borders of each patch have been masked out."
  text += (f"\n\nConsider a {m}x{n} grid, where each number represents a position index ranging "
           f"from 1 ({first}) to {m * n} ({last}):\n\n```\n{_grid(m, n, list(range(1, m * n + 1)))}"
           "\n```\n\n")
  if pair:
    k, l = rng.sample(range(1, m * n + 1), 2)
    relations = _RELATIONS_1ROW if m == 1 else _RELATIONS_1COL if n == 1 else _RELATIONS_GRID
    choices = "\n".join(f"({string.ascii_uppercase[i]}) {k} is {r} {l}"
                        for i, r in enumerate(rng.sample(relations, len(relations))))
    text += (f"For patches currently at positions {k} and {l}, determine their relative position "
             f"in the original image.\n\nSelect the correct answer from the following "
             f"{len(relations)} choices:\n\n{choices}")
    fmt = "The final answer should be a single letter."
  else:
    text += ("For each patch, determine its correct position index in the original image. If a "
             "patch currently at position X should belong at position Y, "
             "place \"Y\" at position X.")
    fmt = f"The final answer should be the position indexes arranged in a {m}x{n} grid."
  instruction = ("First, output the thinking process within <think> </think> tags. Then, provide "
                 "the final answer within <answer> </answer> tags. " if think else
                 "Directly output the final answer. ")
  return f"{text}\n\n{instruction}{fmt}"


def _fill(template: str, rng: random.Random) -> str:
  o, o2, o3 = rng.sample(_OBJECTS, 3)
  c, c2 = rng.sample(_COLOURS, 2)
  return template.format(o=o, o2=o2, o3=o3, c=c, c2=c2, p=rng.choice(_PLACES),
                         r=rng.choice(_RELATIONS_GRID), i=rng.randint(1, 9), j=rng.randint(1, 9),
                         d=rng.randint(0, 99))


def _completion(m: int, n: int, pair: bool, think: bool, rng: random.Random) -> str:
  """A plausible answer; thinking completions carry a few reasoning sentences."""
  perm = rng.sample(range(1, m * n + 1), m * n)
  answer = rng.choice("ABCDEFGH"[:2 if m == 1 or n == 1 else 8]) if pair else _grid(m, n, perm)
  if not think:
    return answer
  thoughts = " ".join(_fill(t, rng) for t in rng.sample(_REASONING, 4))
  return f"<think>\n{thoughts}\n</think>\n<answer>\n{answer}\n</answer>"


def corpus() -> Iterator[str]:
  """The training text: deterministic, weighted towards the prompts the policy actually sees."""
  rng = random.Random(_SEED)
  sizes = [(m, n) for m, n in itertools.product(range(1, 6), repeat=2) if 2 <= m * n <= 16]
  for _ in range(6):
    for (m, n), pair, think, mask in itertools.product(sizes, (False, True), (False, True),
                                                       (False, True)):
      # The text between the chat template's special tokens, as often as the prompts themselves.
      yield from ("system\nYou are a helpful assistant.", "\n", "user\n", "assistant\n")
      yield _jigsaw_prompt(m, n, pair, think, mask, rng)
      yield _completion(m, n, pair, think, rng)
  for _ in range(40):
    for template in _GENERAL + _REASONING:
      yield _fill(template, rng)
  for _ in range(200):
    words = rng.choices(_COMMON_WORDS + _OBJECTS + _COLOURS, k=12)
    yield " ".join(words).capitalize() + rng.choice(".?!")
  yield ("A conversation between User and Assistant. The user asks a question about the image, "
         "and the Assistant solves it.\n\nUser: ")
  yield string.printable


def build() -> tokenizers.Tokenizer:
  """Trains the BPE and adds Qwen2-VL's tokens after it, in Qwen's order."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(), trainer=trainer)
  if tok.get_vocab_size() != BPE_VOCAB_SIZE:
    raise RuntimeError(f"The corpus supports only {tok.get_vocab_size()} BPE tokens, fewer than "
                       f"{BPE_VOCAB_SIZE}: enlarge corpus() or lower BPE_VOCAB_SIZE.")
  for content, special in tokenizer_lib.QWEN2_VL_ADDED_TOKENS:
    tok.add_tokens([tokenizers.AddedToken(content, special=special, normalized=False)])
  return tok


def tokenizer_config(tok: tokenizers.Tokenizer) -> dict:
  """A tokenizer_config.json shaped like Qwen2.5-VL-3B-Instruct's (same keys and special tokens)."""
  added = {
      str(tok.token_to_id(content)): {
          "content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False, "special": special}
      for content, special in tokenizer_lib.QWEN2_VL_ADDED_TOKENS
  }
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": added,
      "additional_special_tokens": [c for c, s in tokenizer_lib.QWEN2_VL_ADDED_TOKENS[1:14]],
      "bos_token": None,
      "chat_template": tokenizer_lib.QWEN2_VL_CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 32768,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }


def write(out_dir: pathlib.Path) -> None:
  """Writes tokenizer.json and tokenizer_config.json into `out_dir`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  tok = build()
  (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
  (out_dir / "tokenizer_config.json").write_text(
      json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=tokenizer_lib.tiny_tokenizer_path(),
                      help="output directory (default: the package's assets/tokenizer_tiny)")
  out_dir = parser.parse_args().out
  write(out_dir)
  print(f"Wrote {out_dir}")


if __name__ == "__main__":
  main()
