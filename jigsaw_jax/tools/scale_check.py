"""Two GRPO updates of a small policy on a fixed synthetic batch, under any mesh or process count.

The same numbers must come out however the work is split: that is what this checks, on CPU.

    # One process, 8 simulated devices: every mesh against the one-device run (a JSON report).
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jigsaw_jax.tools.scale_check \
        --meshes='8,1,1 2,4,1 2,2,2 1,1,8'
    # Multi-controller: one command per process (launch/local_multiprocess.sh starts them), each
    # feeding its own rows and writing a params checksum; then compare the processes' files.
    python -m jigsaw_jax.tools.scale_check --coordinator_address=127.0.0.1:12345 \
        --num_processes=2 --process_id=0 --mesh=1,-1,1 --out=/tmp/scale/process_0
    python -m jigsaw_jax.tools.scale_check --compare /tmp/scale/process_*.json

The policy is a Qwen2.5-VL of the real structure (window and full-attention vision blocks, M-RoPE,
GQA, tied embeddings) shrunk further than the `tiny` preset so that each mesh compiles in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence


def parse_mesh(text: str) -> tuple:
  """'2,4,1' -> (2, 4, 1); -1 fills the remaining devices."""
  return tuple(int(v) for v in text.replace(" ", "").split(","))


def _configure_jax(num_cpu_devices: Optional[int]) -> None:
  """CPU-only settings; must run before jax initialises its backends."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if num_cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (
          f"{flags} --xla_force_host_platform_device_count={num_cpu_devices}").strip()
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def check_model_config():
  """A Qwen2.5-VL of the real structure at toy size (about 0.1M parameters + embeddings)."""
  from jigsaw_jax.models import presets
  from jigsaw_jax.models.config import ModelConfig, TextConfig, VisionConfig
  tiny = presets.tiny()
  return ModelConfig(
      text=TextConfig(vocab_size=tiny.text.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mrope_section=(2, 3, 3), tie_word_embeddings=True),
      vision=VisionConfig(kind="qwen2_5_vl", depth=2, hidden_size=32, intermediate_size=64,
                          num_heads=2, out_hidden_size=64, window_size=56,
                          fullatt_block_indexes=(1,)),
      image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
      vision_start_token_id=tiny.vision_start_token_id,
      vision_end_token_id=tiny.vision_end_token_id)


def synthetic_batch(cfg, prompts: int = 4, group: int = 2, new_tokens: int = 4, seed: int = 0):
  """(SequenceBatch, advantages): `prompts` left-padded prompts of different lengths, each with
  one 4x4-patch image, sampled `group` times; completions of different lengths."""
  import numpy as np
  from jigsaw_jax.models.processing import PromptBatch
  from jigsaw_jax.rl.sequences import build_sequences

  rng = np.random.default_rng(seed)
  grid, merge = (1, 4, 4), cfg.vision.spatial_merge_size
  image_tokens = grid[0] * grid[1] * grid[2] // merge ** 2
  rows = []
  for _ in range(prompts):
    pre, post = rng.integers(1, 1000, rng.integers(1, 4)), rng.integers(1, 1000, rng.integers(1, 4))
    rows.append(np.concatenate([pre, [cfg.vision_start_token_id],
                                [cfg.image_token_id] * image_tokens,
                                [cfg.vision_end_token_id], post]))
  length = max(len(r) for r in rows)
  ids = np.zeros((prompts, length), np.int32)
  mask = np.zeros((prompts, length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  v = cfg.vision
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  pixels = rng.normal(size=(prompts * grid[0] * grid[1] * grid[2], patch_dim)).astype(np.float32)
  batch = PromptBatch(ids, mask, pixels, np.asarray([grid] * prompts, np.int32))
  completion = rng.integers(1, 1000, (prompts * group, new_tokens)).astype(np.int32)
  lengths = rng.integers(1, new_tokens + 1, prompts * group)
  completion_mask = (np.arange(new_tokens)[None] < lengths[:, None]).astype(np.float32)
  seq = build_sequences(cfg, batch, completion, completion_mask, group)
  advantages = rng.normal(size=(prompts * group,)).astype(np.float32)
  return seq, advantages


def train_two_steps(mesh=None, steps: int = 2, rows_of_process: Optional[tuple] = None
                    ) -> Dict[str, Any]:
  """Runs `steps` GRPO updates (KL to the initial policy, beta 0.04) and returns numpy results:
  per-step losses, the first step's grads, the final params, and where things were placed.

  `rows_of_process=(index, count)`: this process feeds only its slice of the rows, as each
  host's input pipeline does in a multi-controller run.
  """
  import flax.linen as nn
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from jigsaw_jax.models import mllm
  from jigsaw_jax.rl.grpo import losses
  from jigsaw_jax.rl.sequences import split_rows
  from jigsaw_jax.rl.optim import make_optimizer
  from jigsaw_jax.rl.policy_steps import PolicySteps

  cfg = check_model_config()
  seq, advantages = synthetic_batch(cfg)
  if rows_of_process is not None:
    index, count = rows_of_process
    seq = list(split_rows(seq, count))[index]
    advantages = np.split(advantages, count)[index]
  loss_cfg = losses.LossConfig(name="grpo", beta=0.04, max_completion_length=4)
  # AdamW as the trainer builds it, except eps: 1e-6 instead of 1e-8, so that gradients at the
  # float32 noise floor (~1e-9 here, where any two summation orders disagree) are not normalised
  # up to full-size steps, which would make rounding noise an O(lr) difference in the params.
  optimizer = make_optimizer(1e-3, total_steps=10, eps=1e-6)
  policy = PolicySteps(cfg, loss_cfg, optimizer, mesh=mesh)

  # Params created directly in their shards (the same values as on one device), then the
  # optimizer state from them.
  module = mllm.VisionLanguageModel(cfg)
  inputs = mllm.dummy_inputs(cfg)
  grid = inputs.pop("image_grid_thw")
  init = lambda r: nn.unbox(module.init(r, **inputs, image_grid_thw=grid))
  with policy._context():
    params = jax.jit(init, out_shardings=policy.param_shardings)(jax.random.key(0))
  opt_state = policy.init_optimizer(params)

  gather = (lambda t: multihost_utils.process_allgather(t, tiled=True)) if \
      jax.process_count() > 1 else (lambda t: jax.tree.map(np.asarray, t))
  ref_logp, _ = policy.score(params, seq)
  out: Dict[str, Any] = {"loss": [], "grad_norm": []}
  for step in range(steps):
    grads, loss, _ = policy.grads(params, seq, advantages, None, ref_logp)
    if step == 0:
      out["grads"] = gather(grads)
    params, opt_state, stats = policy.apply_update(params, opt_state, grads)
    out["loss"].append(float(loss))
    out["grad_norm"].append(float(stats["grad_norm"]))
  out["params"] = gather(params)
  if mesh is not None:
    spec = lambda a: str(a.sharding.spec)
    q = params["params"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    out["placement"] = {
        "mesh": dict(mesh.shape), "q_proj_kernel": spec(q),
        "adam_mu_q_proj_kernel": spec(opt_state[1][0].mu["params"]["decoder"]["layers_0"][
            "self_attn"]["q_proj"]["kernel"]),
        "activation_constraints": policy.constrain_activations,
        "ref_logp": spec(ref_logp)}
  return out


def _flat(tree) -> "np.ndarray":
  import jax
  import numpy as np
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def compare(reference: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, float]:
  """Largest absolute differences: losses, grads (also relative to the largest grad), params."""
  import numpy as np
  g_ref, g = _flat(reference["grads"]), _flat(other["grads"])
  return {
      "loss_abs": float(np.max(np.abs(np.subtract(reference["loss"], other["loss"])))),
      "grads_abs": float(np.max(np.abs(g_ref - g))),
      "grads_rel": float(np.max(np.abs(g_ref - g)) / np.max(np.abs(g_ref))),
      "params_abs": float(np.max(np.abs(_flat(reference["params"]) - _flat(other["params"])))),
  }


def params_digest(params) -> str:
  import jax
  import numpy as np
  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def _write(path: str, result: Dict[str, Any], extra: Dict[str, Any]) -> None:
  import numpy as np
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path + ".npy", _flat(result["params"]).astype(np.float32))
  summary = dict(extra, loss=result["loss"], grad_norm=result["grad_norm"],
                 params_sha256=params_digest(result["params"]),
                 placement=result.get("placement"))
  with open(path + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary))


def compare_files(paths: Sequence[str], reference: Optional[str] = None,
                  atol: float = 1e-5) -> int:
  """Exit status 0 when every process wrote the same params (bit for bit) and, with `reference`
  (a single-device run's file), they match it within `atol`."""
  import numpy as np
  summaries = [json.load(open(p)) for p in paths]
  digests = {s["params_sha256"] for s in summaries}
  ok = len(digests) == 1 and len(summaries) > 1
  print(f"{len(summaries)} processes, params sha256: {sorted(digests)} -> "
        f"{'agree' if ok else 'DISAGREE'}")
  if reference is not None:
    ref = np.load(reference.removesuffix(".json") + ".npy")
    for p in paths:
      diff = float(np.max(np.abs(np.load(p.removesuffix(".json") + ".npy") - ref)))
      print(f"{p}: max |params - single-device params| = {diff:.3g} (tolerance {atol:g})")
      ok = ok and diff <= atol
  return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--meshes", default=None,
                      help="space-separated meshes (data,fsdp,tensor) to compare with one device")
  parser.add_argument("--mesh", default="1,-1,1", help="mesh of a multi-process run")
  parser.add_argument("--devices", type=int, default=None,
                      help="simulated CPU devices of this process (sets XLA_FLAGS)")
  parser.add_argument("--coordinator_address", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--out", default=None, help="write OUT.json (checksum) and OUT.npy")
  parser.add_argument("--single_device", action="store_true",
                      help="the one-device reference run (writes --out)")
  parser.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                      help="compare the processes' files instead of running")
  parser.add_argument("--reference", default=None, help="single-device JSON for --compare")
  parser.add_argument("--atol", type=float, default=1e-5)
  args = parser.parse_args(argv)

  if args.compare:
    return compare_files(args.compare, args.reference, args.atol)

  _configure_jax(args.devices)
  import jax
  from jigsaw_jax.runtime import sharding as sharding_lib

  if args.coordinator_address:
    sharding_lib.maybe_initialize_distributed({
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes, "process_id": args.process_id})
  if args.meshes:
    reference = train_two_steps(None)
    report = {"devices": jax.device_count(), "reference_loss": reference["loss"]}
    for text in args.meshes.split():
      mesh = sharding_lib.make_mesh(parse_mesh(text))
      result = train_two_steps(mesh)
      report[text] = dict(compare(reference, result), placement=result["placement"],
                          loss=result["loss"])
    print("REPORT" + json.dumps(report))
    return 0
  if args.single_device:
    result = train_two_steps(None)
  else:
    mesh = sharding_lib.make_mesh(parse_mesh(args.mesh))
    result = train_two_steps(mesh, rows_of_process=(jax.process_index(), jax.process_count()))
  if args.out:
    _write(args.out, result, {"process_id": jax.process_index(),
                              "process_count": jax.process_count(),
                              "devices": jax.device_count()})
  else:
    print(json.dumps({"loss": result["loss"], "params_sha256": params_digest(result["params"])}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
