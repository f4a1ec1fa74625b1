"""The vision tower against transformers' PyTorch implementation, on the same random weights."""

import dataclasses
import functools

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers import vision_utils

from jigsaw_jax.models import vision, vision_hf
from jigsaw_jax.models import vision_rope
from jigsaw_jax.models.config import VisionConfig

TOL = 1e-4


def _tiny(kind="qwen2_5_vl", **overrides) -> VisionConfig:
  base = dict(kind=kind, depth=3, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=14,
              out_hidden_size=24, window_size=56, fullatt_block_indexes=(1,))
  if kind == "qwen2_vl":
    base.update(intermediate_size=64, hidden_act="quick_gelu", fullatt_block_indexes=())
  base.update(overrides)
  return VisionConfig(**base)


# (test id, config, grid_thw). Window side in LLM tokens = window_size // (2 * 14).
CASES = [
    # 3x5 LLM tokens in 2x2 windows: ragged edge windows (2x2, 2x1, 1x2, 1x1).
    ("q25_nonsquare_ragged_windows", _tiny(), ((1, 6, 10),)),
    # two images of different sizes, windows of 4x4 tokens (larger than the second image).
    ("q25_two_images_big_windows",
     _tiny(window_size=112, fullatt_block_indexes=(0, 2)), ((1, 8, 12), (1, 6, 4))),
    # one-token windows, no full-attention block at all, a 2-frame video next to an image.
    ("q25_unit_windows_video",
     _tiny(window_size=28, fullatt_block_indexes=()), ((2, 4, 6), (1, 2, 2))),
    # every block full attention (windows unused).
    ("q25_all_full", _tiny(fullatt_block_indexes=(0, 1, 2)), ((1, 4, 8), (1, 6, 6))),
    ("q2vl_two_images", _tiny("qwen2_vl"), ((1, 6, 10), (1, 4, 4))),
    ("q2vl_video", _tiny("qwen2_vl", num_heads=2, depth=2), ((2, 4, 4),)),
]


def _hf_model(cfg: VisionConfig, seed: int = 0):
  kwargs = vision_hf.vision_config_to_hf(cfg)
  kwargs.pop("model_type")
  cls = Qwen2_5_VLVisionConfig if cfg.kind == "qwen2_5_vl" else Qwen2VLVisionConfig
  model_cls = (Qwen2_5_VisionTransformerPretrainedModel if cfg.kind == "qwen2_5_vl"
               else Qwen2VisionTransformerPretrainedModel)
  hf_cfg = cls(**kwargs)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(hf_cfg).eval()
  # HF's init (std 0.02, unit norms) makes every activation tiny; use O(1) weights so that a
  # mismatch anywhere shows up well above the tolerance.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
  return model


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _pixels(cfg, grid, seed=1):
  n = sum(t * h * w for t, h, w in grid)
  dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
  return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("name,cfg,grid", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(name, cfg, grid):
  hf = _hf_model(cfg)
  pixels = _pixels(cfg, grid)
  with torch.no_grad():
    want = hf(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()

  params = vision_hf.params_from_hf_state_dict(_state_dict(hf), cfg)
  model = vision.VisionTower(cfg)
  got = jax.jit(functools.partial(model.apply, grid_thw=grid))({"params": params}, pixels)

  n_merged = sum(t * h * w for t, h, w in grid) // cfg.spatial_merge_size**2
  assert got.shape == want.shape == (n_merged, cfg.out_hidden_size)
  assert np.abs(want).mean() > 0.1  # not a vacuous comparison
  delta = float(np.abs(np.asarray(got) - want).max())
  print(f"{name}: max|delta| = {delta:.3e}")
  assert delta < TOL, f"{name}: max|delta| = {delta}"


@pytest.mark.parametrize("grid", [((1, 6, 10),), ((1, 8, 12), (2, 6, 4)), ((1, 4, 4), (1, 2, 14))])
@pytest.mark.parametrize("window_size", [28, 56, 112])
def test_window_index_matches_transformers(grid, window_size):
  want_idx, want_cu = vision_utils.get_vision_window_index(
      torch.tensor(grid), spatial_merge_size=2, window_size=window_size, patch_size=14)
  got_idx, got_cu = vision_rope.window_index(grid, 2, window_size, 14)
  np.testing.assert_array_equal(got_idx, want_idx.numpy())
  np.testing.assert_array_equal(got_cu, want_cu.numpy())


def test_positions_match_transformers():
  grid = ((1, 6, 10), (2, 4, 4))
  want = vision_utils.get_vision_position_ids(torch.tensor(grid), 2).numpy()
  np.testing.assert_array_equal(vision_rope.patch_positions(grid, 2), want)


def test_segment_table_round_trips():
  table = vision_rope.window_attention_table(((1, 6, 10), (1, 2, 2)), 2, 56, 14)
  n = 6 * 10 + 2 * 2
  flat = table.gather.reshape(-1)
  # Every token sits in exactly one real slot, and scatter points back at it.
  real = np.arange(table.gather.shape[1])[None, :] < table.lengths[:, None]
  assert sorted(table.gather[real].tolist()) == list(range(n))
  np.testing.assert_array_equal(flat[table.scatter], np.arange(n))
  assert table.is_padded


@pytest.mark.parametrize("cfg", [_tiny(), _tiny("qwen2_vl")], ids=["qwen2_5_vl", "qwen2_vl"])
def test_weight_map_covers_every_hf_key_once(cfg):
  hf_keys = set(_hf_model(cfg).state_dict())
  names = [name for name, _, _ in vision_hf.hf_weight_map(cfg)]
  paths = [path for _, path, _ in vision_hf.hf_weight_map(cfg)]
  assert len(names) == len(set(names)) and len(paths) == len(set(paths))
  assert set(names) == hf_keys
  assert {k: tuple(v.shape) for k, v in _hf_model(cfg).state_dict().items()} == vision_hf.hf_shapes(cfg)
  # ... and every leaf of our param tree.
  model = vision.VisionTower(cfg)
  grid = ((1, 4, 4),)
  init = functools.partial(model.init, grid_thw=grid)
  shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((16, 1176)))["params"]
  ours = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      nn.meta.unbox(shapes))}
  assert ours == set(paths)


@pytest.mark.parametrize("cfg", [_tiny(), _tiny("qwen2_vl")], ids=["qwen2_5_vl", "qwen2_vl"])
def test_weights_round_trip(cfg):
  # HF -> ours -> HF is exact.
  state = _state_dict(_hf_model(cfg))
  params = vision_hf.params_from_hf_state_dict(state, cfg)
  back = vision_hf.params_to_hf_state_dict(params, cfg)
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  # ours (fresh init) -> HF -> ours is exact, with a prefix.
  model = vision.VisionTower(cfg)
  init = jax.jit(functools.partial(model.init, grid_thw=((1, 4, 4),)))(
      jax.random.key(0), jnp.zeros((16, 1176)))
  init = nn.meta.unbox(init["params"])
  exported = vision_hf.params_to_hf_state_dict(init, cfg, prefix="model.visual.")
  assert all(k.startswith("model.visual.") for k in exported)
  reimported = vision_hf.params_from_hf_state_dict(
      dict(exported, **{"model.language_model.x": np.zeros(1)}), cfg, prefix="model.visual.")
  jax.tree.map(np.testing.assert_array_equal, reimported, jax.tree.map(np.asarray, init))


def test_bad_checkpoint_is_refused_with_key_name():
  cfg = _tiny()
  state = _state_dict(_hf_model(cfg))
  with pytest.raises(KeyError, match="blocks.2.attn.qkv.weight"):
    vision_hf.params_from_hf_state_dict({k: v for k, v in state.items() if k != "blocks.2.attn.qkv.weight"}, cfg)
  with pytest.raises(KeyError, match="blocks.3.norm1.weight"):
    vision_hf.params_from_hf_state_dict(dict(state, **{"blocks.3.norm1.weight": np.ones(32)}), cfg)
  with pytest.raises(ValueError, match="merger.mlp.2.weight"):
    vision_hf.params_from_hf_state_dict(dict(state, **{"merger.mlp.2.weight": np.ones((8, 128))}), cfg)


@pytest.mark.parametrize("cfg", [_tiny(), _tiny("qwen2_vl")], ids=["qwen2_5_vl", "qwen2_vl"])
def test_config_round_trips_through_hf(cfg):
  kwargs = vision_hf.vision_config_to_hf(cfg)
  cls = Qwen2_5_VLVisionConfig if cfg.kind == "qwen2_5_vl" else Qwen2VLVisionConfig
  kwargs.pop("model_type")
  hf_cfg = cls(**kwargs)
  got = vision_hf.vision_config_from_hf(hf_cfg)
  if cfg.kind == "qwen2_vl":  # Qwen2-VL has no windows: the field comes back as the default.
    cfg = dataclasses.replace(cfg, window_size=VisionConfig.window_size)
  assert got == cfg
  assert vision_hf.vision_config_from_hf(hf_cfg.to_dict()) == got


def test_remat_bf16_and_cudnn_variants():
  cfg = _tiny()
  grid = ((1, 6, 10), (1, 2, 2))
  params = vision_hf.params_from_hf_state_dict(_state_dict(_hf_model(cfg)), cfg)
  pixels = jnp.asarray(_pixels(cfg, grid))

  def run(**attrs):
    model = vision.VisionTower(cfg, **attrs)
    return jax.jit(lambda p: model.apply({"params": p}, pixels, grid))

  def loss_and_grad(**attrs):
    model = vision.VisionTower(cfg, **attrs)
    loss = lambda p: jnp.mean(model.apply({"params": p}, pixels, grid) ** 2)
    return jax.value_and_grad(loss), jax.jit(jax.value_and_grad(loss))(params)

  ref = run()(params)
  _, (base_loss, base_grads) = loss_and_grad()
  remat_fn, (remat_loss, remat_grads) = loss_and_grad(remat=True)
  assert "remat" in str(jax.make_jaxpr(remat_fn)(params))  # blocks really are rematerialised
  np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               remat_grads, base_grads)

  # On CPU "cudnn" runs jax.nn.dot_product_attention's XLA path: same numbers, same gradients
  # (finite, although the ragged windows leave padded slots).
  assert float(jnp.abs(run(attention_impl="cudnn")(params) - ref).max()) < TOL
  _, (_, cudnn_grads) = loss_and_grad(attention_impl="cudnn")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               cudnn_grads, base_grads)

  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  out16 = run(dtype="bfloat16", param_dtype="bfloat16")(params16)
  assert out16.dtype == jnp.bfloat16
  rel = float(jnp.abs(out16.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  print(f"bf16 vs fp32: max|delta| / max|out| = {rel:.3e}")
  assert rel < 0.05, rel


def test_params_carry_logical_axes():
  cfg = _tiny()
  init = functools.partial(vision.VisionTower(cfg).init, grid_thw=((1, 4, 4),))
  boxed = jax.eval_shape(init, jax.random.key(0), jnp.zeros((16, 1176)))["params"]
  axes = nn.get_partition_spec(boxed)
  assert axes["blocks_0"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert axes["blocks_0"]["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
  assert axes["merger"]["ln_q"]["scale"] == jax.sharding.PartitionSpec("norm")
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)


def test_errors_name_the_fix():
  cfg = _tiny()
  model = vision.VisionTower(cfg)
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    model.init(jax.random.key(0), jnp.zeros((15, 1176)), ((1, 3, 5),))
  with pytest.raises(ValueError, match="expected \\(16, 1176\\)"):
    model.init(jax.random.key(0), jnp.zeros((12, 1176)), ((1, 4, 4),))
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda g: model.init(jax.random.key(0), jnp.zeros((16, 1176)), g))(jnp.array([[1, 4, 4]]))
