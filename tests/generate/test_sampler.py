"""The rollout engine against transformers' generate, and its sampling guarantees."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from jigsaw_jax.models import hf_io, presets
from jigsaw_jax.models.processing import Processor, collate
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig, filter_logits, sample_tokens


def _mm_token_types(input_ids, cfg):
  """What transformers' processor returns beside the ids (1 marks image tokens); without it
  transformers falls back to 1-D positions for the whole sequence."""
  return torch.tensor(np.asarray(input_ids) == cfg.image_token_id, dtype=torch.long)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random Qwen2.5-VL written by transformers, loaded into ours."""
  cfg = presets.tiny()
  torch.manual_seed(0)
  hf_config = hf_io.hf_config_from_model_config(cfg)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
  with torch.no_grad():  # Larger weights than the init's: well-separated logits, no argmax ties.
    for p in model.parameters():
      if p.ndim > 1:
        p.mul_(8.0)
  directory = tmp_path_factory.mktemp("tiny_hf")
  model.save_pretrained(directory)
  params, ours_cfg = hf_io.load_hf(directory)
  return model, params, ours_cfg


@pytest.fixture(scope="module")
def prompts():
  processor = Processor.from_pretrained(None)
  rng = np.random.default_rng(0)
  texts = ["Solve the 2x1 puzzle.", "Which patch goes on top? Answer with the grid of indices.",
           "1 2"]
  sizes = [(56, 56), (56, 84), (84, 56)]
  encoded = [processor.encode_prompt(t, rng.integers(0, 256, s + (3,), dtype=np.uint8))
             for t, s in zip(texts, sizes)]
  return processor, collate(encoded, processor.pad_token_id, buckets=8)


def test_greedy_equals_transformers_generate(checkpoint, prompts):
  model, params, cfg = checkpoint
  processor, batch = prompts
  assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # three prompt lengths, left-padded
  new_tokens = 12
  with torch.no_grad():
    expected = model.generate(
        input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
        attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
        pixel_values=torch.tensor(batch.pixel_values),
        image_grid_thw=torch.tensor(batch.image_grid_thw, dtype=torch.long),
        mm_token_type_ids=_mm_token_types(batch.input_ids, cfg),
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, pad_token_id=processor.pad_token_id)
  expected = expected[:, batch.input_ids.shape[1]:].numpy()
  sampler = Sampler(cfg, RolloutConfig(max_new_tokens=new_tokens, group_size=1,
                                       sampling=SamplingConfig(greedy=True), eos_ids=(),
                                       pad_id=processor.pad_token_id))
  ours = sampler.generate(params, batch, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
  assert np.asarray(ours.mask).all() and np.asarray(ours.lengths).tolist() == [new_tokens] * 3


def test_eos_ends_a_row_and_is_included(checkpoint, prompts):
  _, params, cfg = checkpoint
  processor, batch = prompts
  greedy = SamplingConfig(greedy=True)
  free = Sampler(cfg, RolloutConfig(max_new_tokens=10, group_size=1, sampling=greedy,
                                    pad_id=processor.pad_token_id)).generate(
                                        params, batch, jax.random.key(0))
  eos = int(free.tokens[0, 3])  # make row 0's 4th token the end of sequence
  first = [int(np.argmax(np.asarray(row) == eos)) if eos in np.asarray(row) else None
           for row in free.tokens]
  stopped = Sampler(cfg, RolloutConfig(max_new_tokens=10, group_size=1, sampling=greedy,
                                       eos_ids=(eos,), pad_id=processor.pad_token_id)).generate(
                                           params, batch, jax.random.key(0))
  for row, stop in enumerate(first):
    length = 10 if stop is None else stop + 1
    assert int(stopped.lengths[row]) == length
    np.testing.assert_array_equal(stopped.tokens[row, :length], free.tokens[row, :length])
    assert (np.asarray(stopped.tokens[row, length:]) == processor.pad_token_id).all()
    assert np.asarray(stopped.mask[row]).tolist() == [True] * length + [False] * (10 - length)
  assert first[0] == 3


def test_shared_and_unshared_prefill_agree(checkpoint, prompts):
  _, params, cfg = checkpoint
  processor, batch = prompts
  outs = []
  for share in (True, False):
    sampler = Sampler(cfg, RolloutConfig(max_new_tokens=8, group_size=4, share_prefill=share,
                                         eos_ids=processor.special_ids.eos_ids,
                                         pad_id=processor.pad_token_id))
    outs.append(sampler.generate(params, batch, jax.random.key(3)))
  shared, unshared = outs
  assert shared.tokens.shape == (12, 8)
  np.testing.assert_array_equal(shared.tokens, unshared.tokens)
  np.testing.assert_array_equal(shared.mask, unshared.mask)
  np.testing.assert_allclose(shared.logprobs, unshared.logprobs, atol=1e-5)
  # The G samples of a prompt differ from each other (per-row keys).
  assert len({tuple(np.asarray(r)) for r in shared.tokens[:4]}) > 1


def test_sampled_logprobs_are_the_policy_log_probabilities(checkpoint, prompts):
  model, params, cfg = checkpoint
  processor, batch = prompts
  sampler = Sampler(cfg, RolloutConfig(max_new_tokens=5, group_size=2, eos_ids=(),
                                       pad_id=processor.pad_token_id))
  out = sampler.generate(params, batch, jax.random.key(7))
  # Score the sampled continuation of row 0 with transformers' forward and compare.
  ids = np.concatenate([batch.input_ids[:1], np.asarray(out.tokens[:1])], axis=1)
  mask = np.concatenate([batch.attention_mask[:1], np.ones((1, 5), np.int32)], axis=1)
  grid = batch.image_grid_thw[:1]
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   pixel_values=torch.tensor(batch.pixel_values[:int(np.prod(grid))]),
                   image_grid_thw=torch.tensor(grid, dtype=torch.long),
                   mm_token_type_ids=_mm_token_types(ids, cfg)).logits
  logp = torch.log_softmax(logits[0, -6:-1].double(), -1).numpy()
  expected = logp[np.arange(5), np.asarray(out.tokens[0])]
  np.testing.assert_allclose(np.asarray(out.logprobs[0]), expected, atol=2e-4)


def test_top_k_and_top_p_support():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
  kept = lambda cfg: (np.asarray(filter_logits(logits, cfg)) > -1e29)[0].tolist()
  assert kept(SamplingConfig(top_k=2, top_p=1.0)) == [True, True, False, False, False]
  # top-p 0.8: 0.4 + 0.3 = 0.7 < 0.8 so the 0.15 token is needed too.
  assert kept(SamplingConfig(top_k=0, top_p=0.8)) == [True, True, True, False, False]
  assert kept(SamplingConfig(top_k=0, top_p=0.01)) == [True, False, False, False, False]
  assert kept(SamplingConfig(top_k=0, top_p=1.0)) == [True] * 5


@pytest.mark.parametrize("cfg,support", [
    (SamplingConfig(temperature=1.0, top_k=0, top_p=1.0), [0, 1, 2, 3, 4, 5, 6, 7]),
    (SamplingConfig(temperature=0.7, top_k=3, top_p=1.0), [0, 1, 2]),
    (SamplingConfig(temperature=1.0, top_k=0, top_p=0.75), [0, 1, 2]),
])
def test_sampling_frequencies_match_the_softmax(cfg, support):
  probs = np.array([0.3, 0.25, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02])
  n = 40000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (n, 8))
  tokens, logprobs = sample_tokens(logits, jax.random.split(jax.random.key(0), n), cfg)
  counts = np.bincount(np.asarray(tokens), minlength=8) / n
  target = np.zeros(8)
  tempered = probs ** (1 / cfg.temperature)
  target[support] = tempered[support] / tempered[support].sum()
  assert set(np.nonzero(counts)[0]) <= set(support)
  # 5 standard errors of a binomial proportion with n = 40000 is at most 0.0125.
  np.testing.assert_allclose(counts, target, atol=5 * np.sqrt(0.25 / n))
  full = np.log(tempered / tempered.sum())
  np.testing.assert_allclose(np.asarray(logprobs), full[np.asarray(tokens)], rtol=1e-5)


def test_kth_largest_equals_top_k_including_ties_and_negatives():
  from jigsaw_jax.generate.sampling import kth_largest
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (64, 300)).astype(np.float32)
  x[:8, :40] = 1.5  # ties around the threshold
  x[8:16] = -np.abs(x[8:16])  # all negative
  x[16, :] = 0.0
  x[17, :5] = -0.0
  for k in (1, 7, 50, 299, 300):
    np.testing.assert_array_equal(np.asarray(kth_largest(jnp.asarray(x), k))[:, 0],
                                  np.sort(x, axis=-1)[:, -k])
