"""LoRA vs MoE-LoRA vs GraphMoE at a matched trainable-parameter budget, on the CPU miniature.

  python benchmarks/adapters.py [--tasks sft,grpo] [--kinds lora,moe_lora,graph_moe]
      [--seeds 0,1,2] [--sft-steps 100] [--grpo-steps 60] [--eval-puzzles 100]
      [--workdir /tmp/adapter_bench]

Every run starts from the same pretrained tiny base (`configs/jigsaw_2x1.py:tiny`, the
`tiny_jigsaw` preset: the miniature's 300-step format pretraining, done once and copied into each
run's workdir), trains only its adapter with the real `sft` / `grpo` tasks (jigsaw_jax/sft/train.py,
jigsaw_jax/rl/grpo/train.py; the miniature's batches: 8 puzzles per step, G=8 for GRPO, beta 0,
binary grid reward), and is evaluated greedily on the miniature's fixed test sets (2x1, its 1x2 swap, and 3x1, which is
never trained on), `--eval-puzzles` puzzles each. Seeds change the adapter's initialisation, the
sampling key and the training data order; the test sets and the base are the same for all runs.

The budgets (tiny: hidden 128, FFN 384, 4 layers; counted, not estimated, and printed):
  lora       rank 16 on q, v, gate, up, down                               126,976 params
  moe_lora   4 experts of rank 4 on gate/up/down, top-2, + LoRA rank 16 on q, v   129,024
  graph_moe  the same + T=2 rethinking steps, concat_proj (W_m: 128 x 4 per layer) 131,072

All kinds share one optimizer setting (AdamW, `--lr` with linear decay to lr/10, 5 warmup
steps, clip 1.0) and balance coefficient 0.01; nothing was tuned per kind. `--kinds full` adds
full fine-tuning of all weights as a reference (`--full-lr`). The table also shows the training
signal (SFT: NLL per answer token; GRPO: accuracy of the sampled completions), averaged over the
first and the last 10 steps. Wall time is the whole
run in this process (compilation and the final evaluation included) on whatever the machine is
doing meanwhile, so compare it within one table only.

Results are appended to <workdir>/results.json as runs finish; a rerun skips finished runs, so
an interrupted matrix can be completed later. The last lines print the table (Markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ADAPTERS = {
    "lora": dict(kind="lora", rank=16),
    "moe_lora": dict(kind="moe_lora", rank=16, experts=4, expert_rank=4, top_k=2),
    "graph_moe": dict(kind="graph_moe", rank=16, experts=4, expert_rank=4, top_k=2, steps=2,
                      combine="concat_proj"),
}
EVAL_SIZES = ("2x1", "1x2", "3x1")


def make_config(task: str, kind: str, seed: int, args):
  from configs import jigsaw_2x1
  c = jigsaw_2x1.get_config("tiny")
  c.task = task
  c.seed = seed
  c.data.pipeline.seed = seed
  c.total_steps = args.sft_steps if task == "sft" else args.grpo_steps
  lr = args.full_lr if kind == "full" else args.lr
  c.optim.learning_rate = lr
  c.optim.end_learning_rate = lr / 10
  c.optim.warmup_steps = 5
  c.eval.sizes = EVAL_SIZES
  c.eval.num_puzzles = args.eval_puzzles
  c.eval.at_start = False
  c.eval.at_end = True
  c.eval.every_steps = 0  # only the final evaluation
  c.checkpoint.save_every_steps = 10_000  # the final step is always saved
  c.metrics.samples_every = 0
  if kind in ADAPTERS:
    for key, value in ADAPTERS[kind].items():
      setattr(c.adapter, key, value)
  return c


def pretrained_base(args):
  """Runs (once) the miniature's pretraining; returns the directory of its checkpoint."""
  import jax
  from jigsaw_jax.models import policy as policy_lib
  from jigsaw_jax.sft import pretrain as pretrain_lib
  base_run = os.path.join(args.workdir, "base_run")
  config = make_config("sft", "none", 42, args)
  model_cfg = policy_lib.model_config(config.model)
  params = policy_lib.initial_params(config.model, model_cfg, jax.random.key(0))
  start = time.time()
  params = pretrain_lib.pretrain(config, model_cfg, policy_lib.processor(config.model), params,
                                 base_run)
  print(f"pretrained base ready ({time.time() - start:.0f} s)", flush=True)
  return os.path.join(base_run, "base"), params, config, model_cfg


def evaluate_base(params, config, model_cfg):
  from jigsaw_jax.eval import evaluate as evaluate_lib
  from jigsaw_jax.models import policy as policy_lib
  processor = policy_lib.processor(config.model)
  evaluator = evaluate_lib.Evaluator(model_cfg, processor, config.data, config.eval,
                                     processor.special_ids.eos_ids)
  records, _ = evaluator(params, 0)
  return {r["size"]: r["accuracy"] for r in records}


def train_curve(workdir: str, task: str, window: int = 10):
  """Mean of the training signal over the first and the last `window` steps, from the run's
  TensorBoard events: SFT's loss (NLL per answer token), GRPO's sampled accuracy."""
  import glob
  import tensorflow as tf
  tag = "sft/loss" if task == "sft" else "reward/accuracy"
  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag and v.HasField("tensor"):
          values[event.step] = float(tf.make_ndarray(v.tensor))
  steps = sorted(values)
  mean = lambda ks: float(statistics.mean(values[k] for k in ks)) if ks else float("nan")
  return {"first": mean(steps[:window]), "last": mean(steps[-window:])}


def run_one(task: str, kind: str, seed: int, base_dir: str, args):
  import jax
  from jigsaw_jax.models import adapters, mllm, policy as policy_lib
  from jigsaw_jax.sft import train as sft
  from jigsaw_jax.rl.grpo import train as trainer
  workdir = os.path.join(args.workdir, f"{task}_{kind}_seed{seed}")
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(base_dir, os.path.join(workdir, "base"))
  config = make_config(task, kind, seed, args)
  model_cfg = policy_lib.model_config(config.model)
  if kind == "full":
    trainable = adapters.count_params(policy_lib.abstract_params(model_cfg)["params"])
  else:
    adapted = dataclasses.replace(model_cfg, adapter=policy_lib.adapter_config(config))
    trainable = adapters.count_params(jax.eval_shape(
        lambda key: mllm.init_adapters(adapted, key), jax.random.key(0)))
  start = time.time()
  if task == "sft":
    sft.train(config, workdir)
    final = {}
  else:
    metrics = trainer.train_and_evaluate(config, workdir)
    final = {"reward": float(metrics["reward/total"]),
             "train_accuracy": float(metrics["reward/accuracy"])}
  wall = time.time() - start
  records = json.load(open(os.path.join(workdir, "eval.json")))
  last = max(r["step"] for r in records)
  accuracy = {r["size"]: r["accuracy"] for r in records if r["step"] == last}
  shutil.rmtree(os.path.join(workdir, "base"), ignore_errors=True)
  return dict(task=task, kind=kind, seed=seed, steps=int(config.total_steps),
              trainable_params=trainable, wall_s=wall, accuracy=accuracy,
              train=train_curve(workdir, task), **final)


def mean_spread(values, digits=3):
  if not values:
    return "n/a"
  mean = statistics.mean(values)
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results, base_accuracy):
  lines = ["| task | adapter | trainable params | " + " | ".join(
      f"eval acc {s}" for s in EVAL_SIZES) + " | train signal, first → last 10 steps | wall s "
           "| seeds |",
           "|---|---|---:|" + "---:|" * len(EVAL_SIZES) + "---|---:|---|"]
  if base_accuracy:
    lines.append("| (base) | none | 0 | " + " | ".join(
        f"{base_accuracy.get(s, float('nan')):.3f}" for s in EVAL_SIZES) + " | | | |")
  for task in ("sft", "grpo"):
    for kind in ("full",) + tuple(ADAPTERS):
      rows = [r for r in results if r["task"] == task and r["kind"] == kind]
      if not rows:
        continue
      accs = [mean_spread([r["accuracy"][s] for r in rows]) for s in EVAL_SIZES]
      signal = "NLL" if task == "sft" else "sampled acc"
      curve = (f"{signal} {mean_spread([r['train']['first'] for r in rows])} → "
               f"{mean_spread([r['train']['last'] for r in rows])}")
      lines.append(f"| {task} ({rows[0]['steps']} steps) | {kind} | "
                   f"{rows[0]['trainable_params']:,} | " + " | ".join(accs) + f" | {curve}"
                   f" | {mean_spread([r['wall_s'] for r in rows], 0)} | "
                   f"{','.join(str(r['seed']) for r in rows)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", default="sft,grpo")
  parser.add_argument("--kinds", default="lora,moe_lora,graph_moe")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--sft-steps", type=int, default=100)
  parser.add_argument("--grpo-steps", type=int, default=60)
  parser.add_argument("--eval-puzzles", type=int, default=100)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--full-lr", type=float, default=1e-4,
                      help="learning rate of the 'full' kind (all weights, the miniature's)")
  parser.add_argument("--workdir", default="/tmp/adapter_bench")
  args = parser.parse_args()
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from absl import logging
  logging.set_verbosity(logging.WARNING)

  os.makedirs(args.workdir, exist_ok=True)
  results_path = os.path.join(args.workdir, "results.json")
  saved = json.load(open(results_path)) if os.path.exists(results_path) else {}
  results = saved.get("runs", [])
  base_dir, base_params, base_config, base_cfg = pretrained_base(args)
  if "base_accuracy" not in saved:
    saved["base_accuracy"] = evaluate_base(base_params, base_config, base_cfg)
  del base_params
  settings = dict(vars(args), adapters=ADAPTERS)
  for r in results:  # runs recorded before the training curve was
    if "train" not in r:
      run_dir = f"{r['task']}_{r['kind']}_seed{r['seed']}"
      r["train"] = train_curve(os.path.join(args.workdir, run_dir), r["task"])
  for task in args.tasks.split(","):
    for seed in [int(s) for s in args.seeds.split(",")]:
      for kind in args.kinds.split(","):
        if any(r["task"] == task and r["kind"] == kind and r["seed"] == seed for r in results):
          continue
        result = run_one(task, kind, seed, base_dir, args)
        results.append(result)
        print(json.dumps(result), flush=True)
        with open(results_path, "w") as f:
          json.dump(dict(saved, runs=results, settings=settings), f, indent=1)
  print()
  print(table(results, saved["base_accuracy"]))


if __name__ == "__main__":
  main()
