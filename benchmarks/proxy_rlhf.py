"""Proxy-RLHF against full GRPO on the CPU miniature, from the same frozen base, same budget.

  python benchmarks/proxy_rlhf.py --workdir /tmp/proxy_bench [--steps 600] [--grpo-steps 100]

1. The base: the miniature's format pretraining (configs/jigsaw_2x1.py:tiny, `pretrain` stage),
   optionally followed by `--base-grpo-steps` of GRPO (a partly trained policy).
2. Proxy-RLHF (configs/proxy_2x1.py:tiny): the base frozen, a proxy of ~1% of its parameters
   trained for `--steps` steps.
3. GRPO (configs/jigsaw_2x1.py:tiny): every parameter of the same base trained for
   `--grpo-steps` steps on the same batches (8 puzzles x G=8 episodes, same data seed). A GRPO
   step costs ~17x a proxy step, so the default gives GRPO more wall time than the proxy's whole
   run (100 GRPO steps against 600 proxy steps); the table states both.

Both are evaluated greedily on the same held-out puzzles (test split, `--eval-puzzles` per size)
before and after. Wall time is the sum of the training steps' time (rollout, reward, update: the
`time/step_s` metric), excluding evaluation and the shared pretraining. The table
is printed and written to `<workdir>/proxy_rlhf.md`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load(spec: str, overrides: dict):
  from jigsaw_jax import configlib
  config = configlib.load_config_file(os.path.join(ROOT, spec))
  with config.unlocked():
    configlib.apply_fields(config, overrides)
  return config


def step_seconds(workdir: str) -> list[float]:
  """time/step_s of every training step, from the run's TensorBoard event files."""
  import tensorflow as tf
  from tensorflow.compat.v1 import train
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for event in train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == "time/step_s":
          values[event.step] = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") \
              else v.simple_value
  return [values[k] for k in sorted(values)]


def accuracies(workdir: str, step: int) -> dict:
  with open(os.path.join(workdir, "eval.json")) as f:
    return {r["size"]: r["accuracy"] for r in json.load(f) if r["step"] == step}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/proxy_bench")
  parser.add_argument("--steps", type=int, default=600, help="Proxy-RLHF steps")
  parser.add_argument("--grpo-steps", type=int, default=100)
  parser.add_argument("--base-grpo-steps", type=int, default=0)
  parser.add_argument("--eval-puzzles", type=int, default=500)
  parser.add_argument("--sizes", default="2x1,1x2")
  parser.add_argument("--proxy", default="", help="extra proxy overrides, key=value,...")
  parser.add_argument("--skip-grpo", action="store_true")
  args = parser.parse_args()

  from jigsaw_jax import configlib, main as main_lib
  from jigsaw_jax.models import presets

  common = {"eval.num_puzzles": args.eval_puzzles, "eval.sizes": tuple(args.sizes.split(",")),
            "eval.every_steps": 0, "eval.at_start": True, "eval.at_end": True,
            "metrics.samples_every": 0}
  os.makedirs(args.workdir, exist_ok=True)
  base_dir = os.path.join(args.workdir, "base_run")

  # 1. The frozen base (pretraining, then optionally some GRPO).
  started = time.time()
  base_cfg = load("configs/jigsaw_2x1.py:tiny", dict(
      common, total_steps=args.base_grpo_steps, **{"eval.at_start": False,
                                                   "eval.at_end": False}))
  main_lib.run(base_cfg, base_dir)
  base_seconds = time.time() - started

  def start_from_base(workdir: str) -> dict:
    """Overrides that make a run start from the base (restored, never retrained)."""
    if args.base_grpo_steps:
      return {"init_from": base_dir, "pretrain.steps": 0}
    if not os.path.isdir(os.path.join(workdir, "base")):
      shutil.copytree(os.path.join(base_dir, "base"), os.path.join(workdir, "base"))
    return {}

  # 2. Proxy-RLHF on the frozen base.
  proxy_dir = os.path.join(args.workdir, "proxy")
  _, extra = configlib.parse_arg(args.proxy)
  proxy_cfg = load("configs/proxy_2x1.py:tiny", dict(
      common, total_steps=args.steps, **start_from_base(proxy_dir), **extra))
  summary = main_lib.run(proxy_cfg, proxy_dir)

  # 3. Full GRPO on the same base and budget.
  rows = []
  proxy_times = step_seconds(proxy_dir)
  before = accuracies(os.path.join(proxy_dir, "eval_frozen_base"), 0)
  after = accuracies(proxy_dir, args.steps)
  rows.append(("Proxy-RLHF (policy frozen)", summary["proxy_params"], summary["param_ratio"],
               before, after, sum(proxy_times), len(proxy_times)))
  if not args.skip_grpo:
    grpo_dir = os.path.join(args.workdir, "grpo")
    grpo_cfg = load("configs/jigsaw_2x1.py:tiny", dict(
        common, total_steps=args.grpo_steps, **start_from_base(grpo_dir)))
    main_lib.run(grpo_cfg, grpo_dir)
    grpo_times = step_seconds(grpo_dir)
    policy = presets.count_params(presets.get_preset(grpo_cfg.model.preset))
    rows.append(("GRPO (all parameters)", policy, 1.0, accuracies(grpo_dir, 0),
                 accuracies(grpo_dir, args.grpo_steps), sum(grpo_times), len(grpo_times)))

  sizes = args.sizes.split(",")
  lines = [
      f"Frozen base: format pretraining ({base_cfg.pretrain.steps} steps)"
      + (f" + {args.base_grpo_steps} GRPO steps" if args.base_grpo_steps else "")
      + f" of `{base_cfg.model.preset}` ({summary['policy_params']:,} parameters); "
      f"8 puzzles x G=8 episodes a step; greedy accuracy on {args.eval_puzzles} held-out "
      "puzzles per size (the proxy: greedy proposals, accept iff p >= 0.5).",
      "",
      "| method | trainable params | ratio | steps (episodes) | "
      + " | ".join(f"{s} before | {s} after" for s in sizes)
      + " | mean before | mean after | train wall (s) | s/step |",
      "|---|---|---|---|" + "---|---|" * len(sizes) + "---|---|---|---|"]
  for name, params, ratio, b, a, seconds, count in rows:
    cells = " | ".join(f"{100 * b.get(s, float('nan')):.1f}% | {100 * a.get(s, float('nan')):.1f}%"
                       for s in sizes)
    mean = lambda d: 100 * sum(d.get(s, float("nan")) for s in sizes) / len(sizes)
    lines.append(f"| {name} | {params:,} | {100 * ratio:.2f}% | {count} ({count * 64:,}) | {cells} "
                 f"| {mean(b):.1f}% | {mean(a):.1f}% | {seconds:.0f} | {seconds / max(count, 1):.2f} |")
  lines += ["", f"base preparation: {base_seconds:.0f} s; proxy settings: "
            f"{json.dumps(proxy_cfg.proxy.to_dict())}, rollout top_k={proxy_cfg.rollout.top_k} "
            f"top_p={proxy_cfg.rollout.top_p}"]
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.workdir, "proxy_rlhf.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
