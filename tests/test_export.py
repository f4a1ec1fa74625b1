"""task=export: a trained run becomes a Hugging Face directory that transformers loads cleanly and
that answers the run's eval puzzles exactly as our evaluator did."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import export as export_config
from configs import jigsaw_2x1
from jigsaw_jax import main
from jigsaw_jax.eval import evaluate
from jigsaw_jax.models import parity, processing
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.runtime import run_config

TOL = 1e-4  # the parity tolerance of tests/models


def _short(config):
  config.pretrain.steps = 2
  config.total_steps = 3
  config.data.pipeline.prompts_per_batch = 2
  config.eval.sizes = ("2x1",)
  config.eval.question_types = ("full",)
  config.eval.num_puzzles = 6
  config.eval.batch_size = 6
  config.checkpoint.async_save = False
  return config


@pytest.mark.slow
def test_export_loads_in_transformers_and_answers_like_our_eval(tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  run_dir, out = str(tmp_path / "run"), tmp_path / "hf"
  main.run(_short(jigsaw_2x1.get_config("tiny")), run_dir)
  config = export_config.get_config()
  config.restore.workdir = run_dir
  config.export.max_shard_bytes = 2_000_000  # the tiny policy in several shards
  main.run(config, str(out))

  assert (out / "model.safetensors.index.json").is_file()
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
  for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
               "preprocessor_config.json"):
    assert (out / name).is_file(), name
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      str(out), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  model.eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  hf_images = transformers.AutoImageProcessor.from_pretrained(str(out))

  # The run's final eval puzzles, with the completions our evaluator wrote for them.
  run = run_config.load(run_dir)
  ours = [json.loads(line) for line in open(os.path.join(run_dir, evaluate.PUZZLE_RECORDS))]
  ours = [r["completion"] for r in ours if r["step"] == run.total_steps]
  puzzles = evaluate.test_puzzles(run.data, run.eval, "2x1", "full", False)
  assert len(ours) == len(puzzles) == 6
  processor = policy_lib.processor(run.model)
  theirs = []
  for puzzle in puzzles:
    encoded = processor.encode_prompt(puzzle.prompt, puzzle.image)
    # The export's own tokenizer and image processor give what ours gives.
    messages = processing.user_turn(puzzle.prompt, with_image=True)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == processor.render_chat(messages)
    pixels = hf_images(images=[puzzle.image], return_tensors="np")
    np.testing.assert_allclose(pixels["pixel_values"], encoded.pixel_values, atol=1e-5)
    np.testing.assert_array_equal(pixels["image_grid_thw"], encoded.image_grid_thw)
    ids = torch.tensor(encoded.input_ids[None].astype(np.int64))
    with torch.no_grad():
      generated = model.generate(
          input_ids=ids, attention_mask=torch.ones_like(ids),
          pixel_values=torch.tensor(encoded.pixel_values),
          image_grid_thw=torch.tensor(encoded.image_grid_thw.astype(np.int64)),
          # What transformers' processor returns with the ids: where the image tokens are (its
          # M-RoPE positions are wrong without it).
          mm_token_type_ids=(ids == processor.image_token_id).long(),
          max_new_tokens=int(run.eval.max_new_tokens))
    theirs.append(hf_tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
  assert theirs == ours
  assert parity.compare(out, verbose=False) < TOL
