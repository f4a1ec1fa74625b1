"""Rollout throughput: our jitted KV-cache sampler against transformers' `generate`.

  python benchmarks/rollout.py [--preset tiny] [--prompts 8,32] [--group 8] [--new-tokens 64]
                               [--repeats 3] [--threads 2]

Both run the same tiny Qwen2.5-VL checkpoint (built here with transformers, random weights) on the
same workload: N jigsaw prompts with one puzzle image each, G samples per prompt, 64 new tokens
forced (EOS ignored), T=1, top-k 50. Both sides are measured alike: one untimed warm-up call on
the same batch, then `--repeats` timed calls (fresh seeds), reported as the median with the
range (min-max) of the repeats; the speedup is the ratio of the medians. Both are pinned to the
same `--threads` CPUs: the process's CPU affinity (what `taskset` sets, and what XLA sizes its
thread pool by) and torch.set_num_threads. PyTorch's OpenMP waiters sleep
(OMP_WAIT_POLICY=PASSIVE, set here unless given). Our compile time (the warm-up's extra time) is
reported apart (it is paid once per shape in a training run). A second table shows what G=8
samples of a 2-token answer cost against one sample, which is where group-shared prefill pays.
The last line is `speedup_vs_transformers=<tokens/s ratio at the largest prompt count>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PyTorch's OpenMP threads spin while they wait. On a machine shared with other jobs (more runnable
# threads than cores) spinning waiters slow transformers down and take cores from our XLA threads
# after it has run; sleeping ones keep both sides at their real speed (as benchmarks/grpo_step.py
# does). Must be set before torch is imported. OMP_WAIT_POLICY=ACTIVE measures the other way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_checkpoint(preset: str, directory: str):
  import torch
  import transformers
  from jigsaw_jax.models import hf_io, presets
  torch.manual_seed(0)
  cfg = presets.get_preset(preset)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_io.hf_config_from_model_config(cfg))
  model.eval().save_pretrained(directory)
  return model


def build_prompts(processor, count: int, image_size: int, seed: int = 0):
  from jigsaw_jax.puzzles import PuzzleSpec, make_puzzle, puzzle_rng
  rng = np.random.default_rng(seed)
  spec = PuzzleSpec(m=2, n=1, question_type="full")
  encoded = []
  for i in range(count):
    image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    puzzle = make_puzzle(image, spec, puzzle_rng(seed, i))
    encoded.append(processor.encode_prompt(puzzle.prompt, puzzle.image))
  return encoded


class Timing:
  """Seconds of repeated calls after a warm-up: the median and the range."""

  def __init__(self, seconds):
    self.seconds = sorted(seconds)
    self.median = statistics.median(self.seconds)

  def rate(self, tokens: int) -> str:
    """tokens/s at the median, with the range over the repeats."""
    return (f"{tokens / self.median:,.0f} ({tokens / self.seconds[-1]:,.0f}-"
            f"{tokens / self.seconds[0]:,.0f})")


def timed(call, repeats: int):
  """(warm-up seconds, Timing of `repeats` more calls, the last result); call(r) runs repeat r."""
  start = time.perf_counter()
  call(0)
  warmup = time.perf_counter() - start
  seconds = []
  for r in range(1, repeats + 1):
    start = time.perf_counter()
    out = call(r)
    seconds.append(time.perf_counter() - start)
  return warmup, Timing(seconds), out


def time_transformers(model, batch, group: int, new_tokens: int, repeats: int):
  import torch
  inputs = dict(
      input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
      attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
      pixel_values=torch.tensor(batch.pixel_values),
      image_grid_thw=torch.tensor(batch.image_grid_thw, dtype=torch.long),
      mm_token_type_ids=torch.tensor(batch.input_ids == model.config.image_token_id,
                                     dtype=torch.long))
  kwargs = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, num_return_sequences=group, pad_token_id=0)

  def call(r):
    torch.manual_seed(r)
    with torch.no_grad():
      return model.generate(**inputs, **kwargs)

  _, timing, out = timed(call, repeats)
  return timing, (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]


def time_ours(sampler, params, batch, repeats: int):
  """(compile seconds: the warm-up's time above the median, Timing, tokens per call)."""
  import jax
  call = lambda r: jax.block_until_ready(sampler.generate(params, batch, jax.random.key(r)))
  warmup, timing, out = timed(call, repeats)
  return warmup - timing.median, timing, int(np.asarray(out.lengths).sum())


def pin_threads(threads: int):
  """Both sides on the same `threads` CPUs: XLA sizes its pool by the affinity, torch is told."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise ValueError(f"--threads {threads} but this process may run on {len(cpus)} CPUs {cpus}.")
  os.sched_setaffinity(0, cpus[:threads])
  return cpus[:threads]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--prompts", default="8,32")
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--image-size", type=int, default=112)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (after a "
                      "warm-up call)")
  parser.add_argument("--threads", type=int, default=2, help="CPUs (and torch threads) per side")
  args = parser.parse_args()

  cpus = pin_threads(args.threads)  # before jax and torch start their thread pools
  import torch
  torch.set_num_threads(args.threads)
  import jax
  from jigsaw_jax.models import hf_io
  from jigsaw_jax.models.processing import Processor, collate
  from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
  from jigsaw_jax.generate.sampling import SamplingConfig

  directory = tempfile.mkdtemp(prefix="rollout_bench_")
  model = build_checkpoint(args.preset, directory)
  params, cfg = hf_io.load_hf(directory)
  processor = Processor.from_pretrained(None)
  sampling = SamplingConfig(temperature=1.0, top_k=50, top_p=1.0)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; both pinned to CPUs {cpus}; median of "
        f"{args.repeats} after a warm-up (range min-max); preset {args.preset}; G={args.group}; "
        f"{args.new_tokens} new tokens forced; images {args.image_size}px; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average at start "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
  print()
  print("| prompts | rows | transformers tok/s (range) | ours tok/s (range) | "
        "ours ms/token-step | ours compile s | speedup (of medians) |")
  print("|---|---|---|---|---|---|---|")
  speedup = None
  for count in [int(x) for x in args.prompts.split(",")]:
    batch = collate(build_prompts(processor, count, args.image_size), processor.pad_token_id, 64)
    hf, hf_tokens = time_transformers(model, batch, args.group, args.new_tokens, args.repeats)
    sampler = Sampler(cfg, RolloutConfig(max_new_tokens=args.new_tokens, group_size=args.group,
                                         sampling=sampling, stop_at_eos=False, pad_id=0))
    compile_s, ours, ours_tokens = time_ours(sampler, params, batch, args.repeats)
    speedup = (ours_tokens / ours.median) / (hf_tokens / hf.median)
    print(f"| {count} | {count * args.group} | {hf.rate(hf_tokens)} | "
          f"{ours.rate(ours_tokens)} | {1000 * ours.median / args.new_tokens:.2f} | "
          f"{compile_s:.1f} | {speedup:.2f}x |")

  print()
  print("Group-shared prefill: the cost of G samples of a 2-token answer (32 prompts)")
  print()
  print("| G | share_prefill | seconds, median (range) | cost vs G=1 |")
  print("|---|---|---|---|")
  batch = collate(build_prompts(processor, 32, args.image_size), processor.pad_token_id, 64)
  base = None
  for group, share in [(1, True), (args.group, True), (args.group, False)]:
    sampler = Sampler(cfg, RolloutConfig(max_new_tokens=2, group_size=group, sampling=sampling,
                                         stop_at_eos=False, share_prefill=share, pad_id=0))
    _, timing, _ = time_ours(sampler, params, batch, args.repeats)
    base = base or timing.median
    print(f"| {group} | {share} | {timing.median:.3f} ({timing.seconds[0]:.3f}-"
          f"{timing.seconds[-1]:.3f}) | {timing.median / base:.2f}x |")
  print()
  print(f"load average at end {os.getloadavg()[0]:.2f}")
  print(f"speedup_vs_transformers={speedup:.2f}")


if __name__ == "__main__":
  main()
