"""Context faithfulness of SmolLM2-135M-Instruct: zero-shot vs FastMem vs FastMem+CD.

    python benchmarks/fastmem_faithfulness.py --out /tmp/fastmem_faithfulness.json

1. Tuning: on the `tune` split of jigsaw_jax/fastmem/faithfulness.py (every `--tune_every`-th item),
   every (lr, λ) of the grid is memorised once for max(steps) steps, with snapshots at each entry
   of `--steps` (a constant-lr run's first 10 steps are its 10-step run), and each snapshot is
   decoded plain (FastMem) and contrastively (FastMem+CD, α = --alpha). The best setting of each
   method is the highest accuracy, then the lowest failure rate, then fewer steps, then the one
   nearest the paper's (1e-5, λ 0.1).
2. Test: every `test` item is answered zero-shot, with FastMem and with FastMem+CD at their tuned
   settings (one memorisation serves both when the settings agree).

The table gives accuracy, format-failure rate ("The answer is:" missing), the rate of answers that
give the model's memorised fact instead of the context's, and seconds per example (memorisation +
decoding, median and mean over the test items, compilation excluded by a warm-up on the tuning
split); the time ratio is against zero-shot decoding in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jigsaw_jax.fastmem import faithfulness  # noqa: E402
from jigsaw_jax import fastmem  # noqa: E402
from jigsaw_jax.fastmem import smollm2  # noqa: E402


def _floats(text):
  return [float(v) for v in text.split(",") if v]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lrs", type=_floats, default=[3e-6, 1e-5, 3e-5])
  parser.add_argument("--kls", type=_floats, default=[0.01, 0.1, 1.0])
  parser.add_argument("--steps", type=lambda t: [int(v) for v in t.split(",")], default=[10, 20])
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--tune_every", type=int, default=2)
  parser.add_argument("--test_limit", type=int, default=0, help="0: the whole test split")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  cfg, decoder_params, tokenizer = smollm2.load_smollm2()
  params = fastmem.as_model_params(decoder_params)
  runner = fastmem.FastMem.for_text_lm(cfg, tokenizer, fastmem.FastMemConfig(layers=args.layers),
                                       max_new_tokens=args.max_new_tokens)

  def prompt(item):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": faithfulness.user_message(item)}], tokenize=False,
        add_generation_prompt=True)
    return fastmem.text_prompt(tokenizer.encode(text, add_special_tokens=False))

  def answer(adapted, item, alpha):
    ids = runner.decode(adapted, params, [prompt(item)], alpha)[0]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()

  def setting(lr, kl, steps):
    return fastmem.FastMemConfig(learning_rate=lr, kl_weight=kl, steps=steps, layers=args.layers)

  # -- tuning --------------------------------------------------------------------------------
  steps = sorted(args.steps)
  segments = [b - a for a, b in zip([0] + steps[:-1], steps)]
  tune = faithfulness.build_items("tune")[::args.tune_every]
  grid_scores = {}  # (method, lr, kl, steps) -> [score]
  start = time.time()
  for n, item in enumerate(tune):
    grid_scores.setdefault(("zero-shot", 0.0, 0.0, 0), []).append(
        faithfulness.score(answer(params, item, 0.0), item))
    for lr, kl in itertools.product(args.lrs, args.kls):
      snapshots, _ = runner.memorize(params, item.context, setting(lr, kl, steps[-1]), segments)
      for k, adapted in zip(steps, snapshots):
        for method, alpha in (("FastMem", 0.0), ("FastMem+CD", args.alpha)):
          grid_scores.setdefault((method, lr, kl, k), []).append(
              faithfulness.score(answer(adapted, item, alpha), item))
    print(f"tune {n + 1}/{len(tune)} {time.time() - start:.0f}s", flush=True)

  summaries = {key: faithfulness.summarize(s) for key, s in grid_scores.items()}
  print("\ntuning split (n=%d): accuracy / failure per setting" % len(tune))
  for key, s in sorted(summaries.items()):
    print(f"  {key[0]:11s} lr={key[1]:<7g} λ={key[2]:<5g} steps={key[3]:<3d} "
          f"acc={s['accuracy']:.3f} fail={s['failure']:.3f}")

  def best(method):
    keys = [k for k in summaries if k[0] == method]
    rank = lambda k: (-summaries[k]["accuracy"], summaries[k]["failure"], k[3],
                      abs(math.log(k[1] / 1e-5)), abs(math.log(k[2] / 0.1)))
    return min(keys, key=rank)

  chosen = {m: best(m) for m in ("FastMem", "FastMem+CD")}
  print("chosen:", {m: dict(lr=k[1], kl_weight=k[2], steps=k[3]) for m, k in chosen.items()})

  # -- test ----------------------------------------------------------------------------------
  test = faithfulness.build_items("test")
  if args.test_limit:
    test = test[:args.test_limit]
  results = {m: [] for m in ("zero-shot", "FastMem", "FastMem+CD")}
  seconds = {m: [] for m in results}
  records = []
  start = time.time()
  for n, item in enumerate(test):
    record = dict(id=item.id, kind=item.kind, answer=item.answer, memorised=item.memorised)
    t0 = time.perf_counter()
    record["zero-shot"] = answer(params, item, 0.0)
    seconds["zero-shot"].append(time.perf_counter() - t0)
    memorised = {}
    for method, alpha in (("FastMem", 0.0), ("FastMem+CD", args.alpha)):
      _, lr, kl, k = chosen[method]
      t0 = time.perf_counter()
      if (lr, kl, k) not in memorised:
        (adapted,), _ = runner.memorize(params, item.context, setting(lr, kl, k))
        jax.block_until_ready(adapted)
        memorised[(lr, kl, k)] = (adapted, time.perf_counter() - t0)
        t0 = time.perf_counter()
      adapted, memorise_seconds = memorised[(lr, kl, k)]
      record[method] = answer(adapted, item, alpha)
      seconds[method].append(memorise_seconds + time.perf_counter() - t0)
    for method in results:
      results[method].append(faithfulness.score(record[method], item))
    records.append(record)
    if (n + 1) % 20 == 0:
      print(f"test {n + 1}/{len(test)} {time.time() - start:.0f}s", flush=True)

  # -- report --------------------------------------------------------------------------------
  zero_median = statistics.median(seconds["zero-shot"])
  print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, float32), test split n={len(test)}, "
        f"greedy, max {args.max_new_tokens} new tokens, CPU ({os.cpu_count()} cores, shared)")
  print("| method | settings | accuracy | failure | memorised | swap acc | memotrap acc "
        "| s/example median (mean) | × zero-shot |")
  print("|---|---|---|---|---|---|---|---|---|")
  table = {}
  for method, scores in results.items():
    s = faithfulness.summarize(scores)
    by_kind = {kind: faithfulness.summarize([x for x, it in zip(scores, test) if it.kind == kind]
                                            or [dict(correct=math.nan, failure=math.nan,
                                                     memorised=math.nan)])
               for kind in ("swap", "memotrap")}
    key = chosen.get(method)
    settings = "-" if key is None else f"lr {key[1]:g}, {key[3]} steps, λ {key[2]:g}" + (
        f", α {args.alpha:g}" if method == "FastMem+CD" else "")
    median, mean = statistics.median(seconds[method]), statistics.mean(seconds[method])
    print(f"| {method} | {settings} | {s['accuracy']:.3f} | {s['failure']:.3f} | "
          f"{s['memorised']:.3f} | {by_kind['swap']['accuracy']:.3f} | "
          f"{by_kind['memotrap']['accuracy']:.3f} | {median:.2f} ({mean:.2f}) | "
          f"{median / zero_median:.1f} |")
    table[method] = dict(s, settings=settings, seconds_median=median, seconds_mean=mean,
                         by_kind=by_kind)
  changed = {m: sum(r[m] != r["zero-shot"] for r in records) for m in ("FastMem", "FastMem+CD")}
  print(f"answers that differ from zero-shot: {changed}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), chosen={m: list(k) for m, k in chosen.items()},
                     tuning={"|".join(map(str, k)): v for k, v in summaries.items()},
                     table=table, records=records), f, indent=1)


if __name__ == "__main__":
  main()
