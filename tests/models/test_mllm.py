"""The whole policy against transformers' Qwen2_5_VL / Qwen2VL ForConditionalGeneration.

Each case builds a tiny random model in transformers, saves it with save_pretrained, loads that
directory with our loader, and compares the M-RoPE index and the logits on a batch (left padding,
non-square images, several images per row, text-only rows).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jigsaw_jax.models import hf_io, mllm

TOL = 1e-4
IMAGE, VIDEO, START, END = 290, 291, 292, 293
VOCAB = 300


# ---------------------------------------------------------------------------------------------
# Helpers shared with test_hf_io.py.
# ---------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """O(1) weights instead of HF's init (std 0.02, zero biases, unit norms), so a wrong bias,
  norm or layout shows up far above the tolerance."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      elif "embed_tokens" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
  return model


def _text_config(tie: bool, layers: int = 2) -> dict:
  return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                   mrope_section=[2, 3, 3]),
              bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie)


_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
            vision_end_token_id=END)


def hf_qwen2_5_vl(window_size=56, fullatt=(1,), depth=2, tie=True, seed=0):
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=_text_config(tie),
      vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=64, window_size=window_size,
                         fullatt_block_indexes=list(fullatt)),
      tie_word_embeddings=tie, **_IDS)
  torch.manual_seed(seed)
  return randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval(), seed)


def hf_qwen2_vl(tie=False, seed=0):
  cfg = transformers.Qwen2VLConfig(
      text_config=_text_config(tie),
      vision_config=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64,
                         hidden_act="quick_gelu"),
      tie_word_embeddings=tie, **_IDS)
  torch.manual_seed(seed)
  return randomize(transformers.Qwen2VLForConditionalGeneration(cfg).eval(), seed)


def make_batch(rows, seed=0, merge=2):
  """rows: per row a list of items, an int (that many text tokens) or a (t, h, w) image grid.

  Returns left-padded (input_ids, attn_mask) int64 [B, L], pixel_values float32 and the grids.
  """
  rng = np.random.RandomState(seed)
  seqs, grids = [], []
  for items in rows:
    seq = []
    for item in items:
      if isinstance(item, int):
        seq += list(rng.randint(0, 280, item))
      else:
        grids.append(tuple(item))
        seq += [START] + [IMAGE] * (int(np.prod(item)) // merge ** 2) + [END]
    seqs.append(seq)
  length = max(map(len, seqs))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for r, seq in enumerate(seqs):
    ids[r, length - len(seq):] = seq
    mask[r, length - len(seq):] = 1
  n = sum(int(np.prod(g)) for g in grids)
  pixels = rng.randn(n, 3 * 2 * 14 * 14).astype(np.float32)
  return ids, mask, pixels, tuple(grids)


def hf_forward(model, ids, mask, pixels=None, grids=()):
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if grids:
    kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                  mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


def our_forward(params, cfg, ids, mask, pixels=None, grids=(), **kwargs):
  index = mllm.rope_index(cfg, ids, grids, mask)
  model = mllm.VisionLanguageModel(cfg)
  out = model.apply(params, jnp.asarray(ids), index.positions, jnp.asarray(mask),
                    None if not grids else jnp.asarray(pixels), grids or None, **kwargs)
  return out, index


def load_saved(model, directory):
  model.save_pretrained(directory)
  return hf_io.load_hf(directory)


# ---------------------------------------------------------------------------------------------
# Parity cases.
# ---------------------------------------------------------------------------------------------

CASES = {
    # 2x2-token windows over non-square images (ragged edge windows); the second row is padded.
    "q25_small_windows_padded": (
        dict(kind="q25", window_size=56, fullatt=(1,), depth=2, tie=True),
        [[3, (1, 8, 12), 4], [2, (1, 12, 4), 1]]),
    # 4x4-token windows, full attention at blocks 0 and 2, untied head; two images in one row and
    # a text-only row in the same batch.
    "q25_two_images_and_text_row": (
        dict(kind="q25", window_size=112, fullatt=(0, 2), depth=3, tie=False),
        [[2, (1, 4, 4), 3, (1, 8, 6), 2], [7]]),
    # Qwen2-VL: LayerNorm + quick-GELU tower, full attention everywhere.
    "q2vl_padded": (dict(kind="q2vl", tie=False), [[4, (1, 6, 10), 3], [5, (1, 4, 4)]]),
    # Text only (no image anywhere), left padding.
    "q25_text_only": (dict(kind="q25", window_size=56, fullatt=(1,), depth=2, tie=True),
                      [[9], [4]]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Builds (and caches) one transformers model + our loaded copy per model config."""
  cache = {}

  def get(spec):
    key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                       for k, v in spec.items()))
    if key not in cache:
      spec = dict(spec)
      kind = spec.pop("kind")
      model = hf_qwen2_5_vl(**spec) if kind == "q25" else hf_qwen2_vl(**spec)
      params, cfg = load_saved(model, tmp_path_factory.mktemp("hf"))
      cache[key] = (model, params, cfg)
    return cache[key]

  return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_and_logits_match_transformers(built, case):
  spec, rows = CASES[case]
  model, params, cfg = built(spec)
  ids, mask, pixels, grids = make_batch(rows)
  ours, index = our_forward(params, cfg, ids, mask, pixels, grids)

  mm = torch.tensor((ids == IMAGE).astype(np.int64))
  ref_pos, ref_delta = model.model.get_rope_index(
      torch.tensor(ids), mm_token_type_ids=mm,
      image_grid_thw=torch.tensor(grids) if grids else None, attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(index.positions, ref_pos.numpy())
  np.testing.assert_array_equal(index.deltas, ref_delta.numpy().reshape(-1))

  ref = hf_forward(model, ids, mask, pixels, grids)
  real = mask.astype(bool)
  diff = np.abs(np.asarray(ours.logits) - ref)[real].max()
  assert diff < TOL, f"{case}: max |Δlogits| = {diff:.2e}"
  assert np.abs(ref[real]).max() > 1.0  # The comparison is not between near-zero numbers.


def test_kv_cache_decoding_matches_full_forward(built):
  """Prefill (images, left padding) then decode steps == one forward over the whole sequence,
  and decode positions (cache length + rope delta) == the reference's rope index."""
  spec, rows = CASES["q25_small_windows_padded"]
  _, params, cfg = built(spec)
  ids, mask, pixels, grids = make_batch(rows)
  new = np.array([[5, 17, 33], [250, 1, 96]])
  full_ids = np.concatenate([ids, new], 1)
  full_mask = np.concatenate([mask, np.ones_like(new)], 1)
  full, full_index = our_forward(params, cfg, full_ids, full_mask, pixels, grids)

  model = mllm.VisionLanguageModel(cfg)

  @functools.partial(jax.jit, static_argnames=("grids", "last"))
  def apply(params, ids, positions, mask, pixels, cache, grids=None, last=False):
    return model.apply(params, ids, positions, mask, pixels, grids, cache, last_logits_only=last)

  index = mllm.rope_index(cfg, ids, grids, mask)
  cache = mllm.decoder_lib.init_cache(cfg.text, ids.shape[0], full_ids.shape[1])
  out = apply(params, ids, index.positions, mask, pixels, cache, grids=grids)
  real = mask.astype(bool)  # Padding positions hold garbage; only real tokens must agree.
  np.testing.assert_allclose(np.asarray(out.logits)[real],
                             np.asarray(full.logits[:, :ids.shape[1]])[real], atol=TOL)
  cache = out.cache
  for step in range(new.shape[1]):
    positions = mllm.decode_positions(cache, jnp.asarray(index.deltas))
    col = ids.shape[1] + step
    np.testing.assert_array_equal(positions[:, :, 0], full_index.positions[:, :, col])
    out = apply(params, new[:, step:step + 1], positions, np.ones((2, 1), np.int32), None,
                cache, last=True)
    np.testing.assert_allclose(out.logits[:, 0], full.logits[:, col], atol=TOL)
    cache = out.cache
  assert int(cache["index"]) == full_ids.shape[1]
  np.testing.assert_array_equal(mllm.decoder_lib.cache_lengths(cache), full_mask.sum(1))


def test_hidden_states_and_jit_with_static_grid(built):
  spec, rows = CASES["q25_small_windows_padded"]
  _, params, cfg = built(spec)
  ids, mask, pixels, grids = make_batch(rows)
  index = mllm.rope_index(cfg, ids, grids, mask)
  model = mllm.VisionLanguageModel(cfg)
  forward = jax.jit(lambda p, i, pos, m, px: model.apply(p, i, pos, m, px, grids,
                                                         return_hidden=True))
  out = forward(params, ids, index.positions, mask, pixels)
  assert out.hidden.shape == ids.shape + (cfg.text.hidden_size,)
  assert out.logits.dtype == jnp.float32
  ref, _ = our_forward(params, cfg, ids, mask, pixels, grids)
  np.testing.assert_allclose(out.logits, ref.logits, atol=TOL)


def test_rope_index_rejects_inconsistent_images(built):
  spec, _ = CASES["q25_small_windows_padded"]
  _, _, cfg = built(spec)
  ids, mask, _, grids = make_batch([[2, (1, 4, 4), 2]])
  with pytest.raises(ValueError, match="needs"):
    mllm.rope_index(cfg, ids, ((1, 8, 8),), mask)
  with pytest.raises(ValueError, match="more images"):
    mllm.rope_index(cfg, ids, (), mask)
  with pytest.raises(ValueError, match="more rows"):
    mllm.rope_index(cfg, ids, grids + grids, mask)


def test_every_parameter_has_logical_axes():
  from jigsaw_jax.models import presets
  cfg = presets.get_preset("tiny")
  boxed = mllm.abstract_params(cfg)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 50
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"parameter without logical axis names: {leaf}"
    assert len(leaf.names) == len(leaf.value.shape)
