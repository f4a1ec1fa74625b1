"""Memory plan: per-device bytes of a GRPO run on a mesh, from compiled programs, without weights.

    python -m jigsaw_jax.tools.plan --config=configs/jigsaw_3x3.py --devices=8 --mesh=1,8,1
    python -m jigsaw_jax.tools.plan --config=configs/jigsaw_2x1.py --devices=8 --mesh=1,4,2 \
        --preset=qwen2_5_vl_3b --micro_batches=64 --json=/tmp/plan.json

For each model preset it compiles, over N simulated CPU devices and on abstract inputs
(`jax.ShapeDtypeStruct` with shardings: nothing is allocated):

- the GRPO gradient of one micro-batch (`PolicySteps` grads: vision tower, decoder, completion
  log-probs, loss, backward) with the config's dtype, remat and micro-batch size;
- the optimizer update (`PolicySteps` apply_update: clip + AdamW over the sharded state);
- the rollout prefill (one row per distinct prompt, KV cache of the prompt) and the decode loop
  (G rows per prompt reading that cache, each with its own max_new_tokens slots),

and prints, per device: params, optimizer state, the KL reference copy, gradients, the compiled
programs' temporary buffers (activations and the decode slots; `compiled.memory_analysis()`),
the prompt KV cache, and the peaks they add up to. The sequence is a prompt of `--image_tokens`
(one square image) plus `--text_tokens`, then `config.rollout.max_new_tokens` completion tokens.

The numbers come from XLA's CPU compiler. TPU and GPU compilers schedule and fuse differently
(and CPU may widen some bfloat16 temporaries to float32), so treat temporaries as estimates
within tens of percent; params, optimizer state and KV cache are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

GIB = 1024 ** 3
# AOT targets compiled by libtpu's compiler without any TPU attached (`pip install libtpu` of the
# version jax[tpu] names): (topology, chip config, chips per host).
TPU_TARGETS = {
    "tpu:v5e-8": ("v5e:2x4", "default", (2, 2, 1)),
    "tpu:v5e-16": ("v5e:4x4", "default", (2, 2, 1)),
    "tpu:v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "tpu:v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
}
# Device memory of the accelerators users run on (per chip / GPU).
HARDWARE = {"v5e (16 GiB)": 16, "v4 (32 GiB)": 32, "H100 (80 GiB)": 80}


def _ensure_devices(count: int, argv: Sequence[str]) -> None:
  """Makes the CPU backend show `count` devices: sets XLA_FLAGS before jax starts, or re-executes
  this module when jax was already imported with other settings."""
  flag = f"--xla_force_host_platform_device_count={count}"
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = flag in flags.split() and os.environ.get("JAX_PLATFORMS") == "cpu"
  if wanted:
    return
  kept = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  env = dict(os.environ, XLA_FLAGS=f"{kept} {flag}".strip(), JAX_PLATFORMS="cpu")
  if "jax" in sys.modules:
    os.execve(sys.executable, [sys.executable, "-m", "jigsaw_jax.tools.plan", *argv], env)
  os.environ.update(env)


def _tpu_devices(target: str):
  """The devices of a TPU slice for ahead-of-time compilation (libtpu's compiler, no TPU)."""
  from jax.experimental import topologies
  topology, chip_config, per_host = TPU_TARGETS[target]
  try:
    return topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=1, wrap=(False, False, False)).devices
  except Exception as e:  # noqa: BLE001  (libtpu missing or of another version)
    raise SystemExit(f"--target={target} needs libtpu's compiler: pip install the libtpu version "
                     f"that jax[tpu] pins for this jax. ({type(e).__name__}: {e})") from e


def _shard_bytes(abstract: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStruct carrying shardings."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _abstract(tree: Any, shardings: Any) -> Any:
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _rows_first(tree: Any, mesh) -> Any:
  """Shardings for outputs whose leading axis is rows (scalars replicated)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from jigsaw_jax.runtime import sharding as sharding_lib
  return jax.tree.map(
      lambda x: (NamedSharding(mesh, PartitionSpec()) if not x.shape else
                 sharding_lib.rows_sharding(mesh, len(x.shape))), tree)


def _temp(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(stats.temp_size_in_bytes) if stats is not None else -1


def plan_preset(config, preset: str, mesh, *, image_tokens: int, text_tokens: int,
                rollout: bool = True, num_layers: Optional[int] = None,
                vision_depth: Optional[int] = None, log=print) -> Dict[str, Any]:
  """Compiles the GRPO step (and the rollout) of `preset` on `mesh`; returns per-device bytes."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from jigsaw_jax.models import mllm, presets
  from jigsaw_jax.rl.grpo import losses
  from jigsaw_jax.runtime import sharding as sharding_lib
  from jigsaw_jax.rl import optim as optim_lib
  from jigsaw_jax.rl.policy_steps import PolicySteps
  from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
  from jigsaw_jax.generate.sampling import SamplingConfig

  m = config.model
  cfg = presets.get_preset(preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=bool(m.remat),
                           attention_impl=m.attention_impl)
  # Shallower copies of a preset: compile faster, and two depths give the per-layer cost.
  if num_layers is not None:
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=num_layers))
  if vision_depth is not None:
    # Block indexes past the cut go (full attention: Qwen2.5-VL; DeepStack taps: Qwen3-VL).
    cut = {name: tuple(i for i in getattr(cfg.vision, name) if i < vision_depth)
           for name in ("fullatt_block_indexes", "deepstack_visual_indexes")
           if hasattr(cfg.vision, name)}
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=vision_depth,
                                                              **cut))
  o, rl = config.optim, config.rl
  optimizer = optim_lib.make_optimizer(o.learning_rate, config.total_steps, o.warmup_steps,
                                       o.weight_decay, o.grad_clip, o.b1, o.b2, o.eps,
                                       o.end_learning_rate)
  loss_cfg = losses.LossConfig(name=rl.loss, epsilon_low=rl.epsilon_low,
                               epsilon_high=rl.epsilon_high, beta=rl.beta,
                               kl_estimator=rl.kl_estimator,
                               max_completion_length=config.rollout.max_new_tokens)
  policy = PolicySteps(cfg, loss_cfg, optimizer, config.rollout.temperature,
                                 mesh=mesh, rules=config.mesh.rules)
  rep = NamedSharding(mesh, PartitionSpec())

  # Shapes of one step.
  prompts = int(config.data.pipeline.prompts_per_batch)
  group = int(config.data.pipeline.group_size)
  micro = int(rl.micro_batches)
  rows = prompts * group // micro
  try:
    pixel_rows, patch_dim, image_grid = mllm.square_image_inputs(cfg, image_tokens)
  except ValueError as e:
    raise ValueError(f"--image_tokens={image_tokens}: {e}") from e
  new_tokens = int(config.rollout.max_new_tokens)
  prompt_len = image_tokens + text_tokens + 2  # + <|vision_start|>, <|vision_end|>
  length = prompt_len + new_tokens
  parts = sharding_lib.batch_parallelism(mesh)
  for what, n in (("rows of a micro-batch", rows), ("prompts of a rollout", prompts)):
    if n % parts:
      raise ValueError(f"{n} {what} do not split over the {parts} data-parallel devices of mesh "
                       f"{dict(mesh.shape)}; change --micro_batches or the mesh.")

  params = _abstract(nn.meta.unbox(mllm.abstract_params(cfg)), policy.param_shardings)
  opt_state = _abstract(jax.eval_shape(optimizer.init, params), policy.opt_state_shardings)
  row = lambda shape, dtype, axis=0: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding_lib.rows_sharding(mesh, len(shape), axis))

  def pixels(images: int):
    n = images * pixel_rows
    return jax.ShapeDtypeStruct((n, patch_dim), jnp.float32,
                                sharding=sharding_lib.pixel_sharding(mesh, n))

  out: Dict[str, Any] = dict(
      preset=preset if num_layers is None and vision_depth is None else
      f"{preset} (L={cfg.text.num_layers}, V={cfg.vision.depth})", mesh="(" + ",".join(str(s) for s in mesh.devices.shape) + ")",
      devices=mesh.size, rows_per_micro_batch=rows, rows_per_device=rows // parts,
      micro_batches=micro, sequence=length, params=_shard_bytes(params),
      opt_state=_shard_bytes(opt_state), ref_params=_shard_bytes(params) if rl.beta else 0,
      grads=_shard_bytes(params))

  # GRPO gradient of one micro-batch: its prompts once (whole groups; a micro-batch cut through
  # groups is planned as one prompt per row) and its rows' completions.
  micro_group = group if rows % group == 0 else 1
  micro_prompts = rows // micro_group
  prompt_rows = lambda shape, dtype, axis=0: (
      row(shape, dtype, axis) if micro_prompts % parts == 0 else
      jax.ShapeDtypeStruct(shape, dtype, sharding=rep))
  grid = (image_grid,) * micro_prompts
  batch = (prompt_rows((micro_prompts, prompt_len), jnp.int32),
           prompt_rows((micro_prompts, prompt_len), jnp.int32),
           prompt_rows((3, micro_prompts, prompt_len), jnp.int32, 1), pixels(micro_prompts),
           row((rows, new_tokens), jnp.int32), row((rows, new_tokens), jnp.float32),
           row((3, rows, new_tokens), jnp.int32, 1))
  # advantages, old log-probs (None: mu = 1), reference log-probs (the KL term), dropout key,
  # and the step's token normaliser, a scalar the trainer always passes.
  extra = (row((rows,), jnp.float32), None,
           row((rows, new_tokens), jnp.float32) if rl.beta else None, None,
           jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
  start = time.time()
  with policy._context():
    # Static: whether the G rows of a prompt share its forward pass (as the trainer's).
    shared = policy.shared_group(rows, micro_group, len(grid) * micro_group) > 1
    compiled = policy._grads.lower((grid, micro_group, None), shared, params, *batch,
                                   *extra).compile()
  out["grads_temp"] = _temp(compiled)
  log(f"  {preset} grads compiled in {time.time() - start:.0f} s")
  start = time.time()
  with policy._context():
    compiled = policy._update.lower(params, opt_state, params).compile()
  out["update_temp"] = _temp(compiled)
  log(f"  {preset} update compiled in {time.time() - start:.0f} s")

  if rollout:
    sampler = Sampler(cfg, RolloutConfig(
        max_new_tokens=new_tokens, group_size=group,
        sampling=SamplingConfig(temperature=config.rollout.temperature,
                                top_k=config.rollout.top_k, top_p=config.rollout.top_p),
        eos_ids=(0,), pad_id=0))
    prompt_grid = (image_grid,) * prompts
    prefill_in = (params, row((prompts, prompt_len), jnp.int32),
                  row((3, prompts, prompt_len), jnp.int32, 1),
                  row((prompts, prompt_len), jnp.int32), pixels(prompts))
    prefill_fn = lambda p, ids, pos, mask, pix: sampler._prefill_impl(
        p, ids, pos, mask, pix, grid=prompt_grid)
    with policy._context():
      shapes = jax.eval_shape(prefill_fn, *prefill_in)
      prefill = jax.jit(prefill_fn, out_shardings=_rows_first(shapes, mesh))
      start = time.time()
      compiled = prefill.lower(*prefill_in).compile()
    out["prefill_temp"] = _temp(compiled)
    log(f"  {preset} prefill compiled in {time.time() - start:.0f} s")
    # Decode: first-token logits repeated G times along the rows (Sampler.generate does it
    # between); the prompt cache stays one row per prompt, shared read-only by its G rows, and
    # decode allocates its own max_new_tokens slots per row (counted in its temporaries).
    total = prompts * group
    first, cache = shapes
    first = first._replace(logits=jax.ShapeDtypeStruct((total,) + first.logits.shape[1:],
                                                       first.logits.dtype))
    first, cache = _abstract((first, cache), _rows_first((first, cache), mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    decode_in = (params, first, cache, row((total,), jnp.int32),
                 jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))
    decode_fn = lambda p, out, c, d, k: sampler._decode_impl(p, None, out, c, d, k,
                                                             hook=sampler.hook)
    with policy._context():
      decode_shapes = jax.eval_shape(decode_fn, *decode_in)
      decode = jax.jit(decode_fn, out_shardings=_rows_first(decode_shapes, mesh))
      start = time.time()
      compiled = decode.lower(*decode_in).compile()
    out["decode_temp"] = _temp(compiled)
    out["kv_cache"] = _shard_bytes(cache)
    out["rollout_rows_per_device"] = total // parts
    log(f"  {preset} decode compiled in {time.time() - start:.0f} s")

  resident = out["params"] + out["opt_state"] + out["ref_params"]
  accumulator = out["grads"] if micro > 1 else 0
  out["train_peak"] = resident + max(out["grads"] + accumulator + out["grads_temp"],
                                     out["grads"] + out["update_temp"])
  if rollout:
    out["rollout_peak"] = resident + out["kv_cache"] + max(out["prefill_temp"],
                                                          out["decode_temp"])
  return out


COLUMNS = [("preset", "preset"), ("mesh", "mesh (d,f,t)"), ("micro_batches", "micro"),
           ("rows_per_device", "rows/dev"), ("params", "params"), ("opt_state", "Adam"),
           ("ref_params", "KL ref"), ("grads", "grads"), ("grads_temp", "step act."),
           ("update_temp", "update tmp"), ("kv_cache", "KV cache"),
           ("prefill_temp", "prefill tmp"), ("decode_temp", "decode tmp"),
           ("train_peak", "train peak"), ("rollout_peak", "rollout peak")]


def format_table(results: List[Dict[str, Any]]) -> str:
  """A markdown table, sizes in GiB per device, and which accelerators hold the larger peak."""
  header = [title for _, title in COLUMNS] + ["fits"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    cells = []
    for key, _ in COLUMNS:
      value = r.get(key, "")
      if key in ("preset", "mesh", "micro_batches", "rows_per_device") or value == "":
        cells.append(str(value))
      else:
        cells.append(f"{value / GIB:.2f}")
    peak = max(r["train_peak"], r.get("rollout_peak", 0)) / GIB
    fits = [name for name, gib in HARDWARE.items() if peak <= gib * 0.95]
    cells.append(", ".join(fits) if fits else "none")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="config file[:args], as for main.py")
  parser.add_argument("--devices", type=int, default=8, help="simulated devices")
  parser.add_argument("--mesh", default=None,
                      help="data,fsdp,tensor (-1 fills); default: the config's mesh.shape")
  parser.add_argument("--preset", action="append", default=None,
                      help="model preset (repeatable); default: qwen2_5_vl_3b and qwen2_5_vl_7b")
  parser.add_argument("--micro_batches", type=int, default=None,
                      help="override config.rl.micro_batches")
  parser.add_argument("--image_tokens", type=int, default=400,
                      help="merged image tokens of the prompt's one (square) image")
  parser.add_argument("--text_tokens", type=int, default=200, help="text tokens of the prompt")
  parser.add_argument("--no_rollout", action="store_true", help="skip prefill/decode")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="compile a copy with this many decoder layers (faster; run two depths "
                      "to get the cost per layer)")
  parser.add_argument("--vision_depth", type=int, default=None,
                      help="likewise for the vision tower's blocks")
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--target", default="cpu", choices=["cpu", *TPU_TARGETS],
                      help="cpu: --devices simulated CPU devices (XLA's CPU compiler); "
                      "tpu:*: compile for that TPU slice with libtpu's compiler, no TPU needed")
  args = parser.parse_args(argv)

  if args.target == "cpu":
    _ensure_devices(args.devices, argv)
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"  # libtpu compiles; no TPU backend is started
  import jax
  from jigsaw_jax import configlib
  from jigsaw_jax.runtime import sharding as sharding_lib

  config = configlib.load_config_file(args.config)
  if args.micro_batches:
    config.rl.micro_batches = args.micro_batches
  shape = (tuple(int(s) for s in args.mesh.split(",")) if args.mesh
           else tuple(config.mesh.shape))
  devices = None
  if args.target != "cpu":
    devices = _tpu_devices(args.target)
  mesh = sharding_lib.make_mesh(shape, devices=devices)
  presets = args.preset or ["qwen2_5_vl_3b", "qwen2_5_vl_7b"]
  print(f"Planning {presets} on mesh {dict(mesh.shape)} ({mesh.size} {args.target} devices), "
        f"dtype {config.model.dtype}, remat {config.model.remat}.", flush=True)
  results = []
  for preset in presets:
    results.append(plan_preset(config, preset, mesh, image_tokens=args.image_tokens,
                               text_tokens=args.text_tokens, rollout=not args.no_rollout,
                               num_layers=args.num_layers, vision_depth=args.vision_depth,
                               log=lambda s: print(s, flush=True)))
  print(format_table(results))
  print("GiB per device. train peak = params + Adam + KL ref + grads (x2 when accumulating "
        "micro-batches) + step activations; rollout peak = params + Adam + KL ref + KV cache + "
        "the larger prefill/decode temporaries. 'fits' allows 5% headroom.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
