"""Evaluation on fixed puzzle test sets: greedy decoding, the paper's metrics, tables and plots.

For every (size, question type, thinking) in `config.eval`, the test set is the first
`eval.num_puzzles` puzzles of the test split generated with `eval.seed` (the same every time, like
the reference's jigsaw_seed=0 sets). A record per set and step goes to `<workdir>/eval.json`:

    {"size": "2x1", "question_type": "full", "think": false, "step": 0, "accuracy": ...,
     "score": ..., "format_rate": ..., "mean_length": ..., "mean_tokens": ..., "n": ...}

accuracy is the exact-match rate the paper reports, score the mean accuracy reward (fractional
for full puzzles), mean_length the mean completion length in characters (the reference's
`length`). `eval.md` is the same as a table, `eval.png` a chart, and `gallery_step<k>.png` shows
solved and failed puzzles.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from jigsaw_jax import data as data_lib
from jigsaw_jax import fastmem as fastmem_lib
from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.processing import Processor, collate
from jigsaw_jax.puzzles import rewards as rewards_lib
from jigsaw_jax.rl.proxy import sampler as proxy_sampler_lib
from jigsaw_jax.rl import rollout_rewards
from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
from jigsaw_jax.generate.sampling import SamplingConfig
from jigsaw_jax.runtime import restore as restore_lib


def _size(text: str) -> tuple[int, int]:
  try:
    m, n = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"A puzzle size looks like '2x1' (rows x columns); got {text!r}.") from None
  return m, n


def eval_sets(eval_cfg) -> List[Dict[str, Any]]:
  return [dict(size=size, question_type=q, think=bool(t))
          for size in eval_cfg.sizes for q in eval_cfg.question_types for t in eval_cfg.thinks]


def test_puzzles(data_cfg, eval_cfg, size: str, question_type: str, think: bool):
  """The fixed test set of one configuration: a list of Puzzle, plus their images."""
  m, n = _size(size)
  cfg = copy.deepcopy(data_cfg)
  with cfg.unlocked():
    cfg.source.split = "test"
    cfg.source.seed = int(eval_cfg.seed)
    p = cfg.pipeline
    p.seed, p.group_size, p.num_prompts = int(eval_cfg.seed), 1, int(eval_cfg.num_puzzles)
    p.prompts_per_batch, p.shuffle, p.drop_remainder = int(eval_cfg.num_puzzles), False, False
    p.curriculum = []
    p.read_threads, p.worker_count = 0, 0
    p.puzzle.m, p.puzzle.n, p.puzzle.question_type, p.puzzle.think = m, n, question_type, think
    # Each size as stated (the paper's swapped "2x1" sets are the mean of 2x1 and 1x2 here).
    p.puzzle.shuffle_mn = bool(eval_cfg.shuffle_mn)
  batch = next(iter(data_lib.make_dataset(cfg)))
  return [dataclasses.replace(p, source_index=int(i))
          for p, i in zip(batch["puzzle"], batch["image_index"])]


class Evaluator:
  """Greedy evaluation of a policy on the configured test sets (built once, reused every call)."""

  def __init__(self, model_cfg, processor: Processor, data_cfg, eval_cfg, eos_ids: Sequence[int]):
    self.processor = processor
    self.eval_cfg = eval_cfg
    self.sets = []
    for spec in eval_sets(eval_cfg):
      puzzles = test_puzzles(data_cfg, eval_cfg, **spec)
      encoded = [processor.encode_prompt(p.prompt, p.image) for p in puzzles]
      self.sets.append((spec, puzzles, encoded))
    self.sampler = Sampler(model_cfg, RolloutConfig(
        max_new_tokens=int(eval_cfg.max_new_tokens), group_size=1,
        sampling=SamplingConfig(greedy=True, suppress_ids=(
            model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
            model_cfg.vision_end_token_id)), eos_ids=tuple(eos_ids),
        pad_id=processor.pad_token_id))
    # FastMem (config.eval.fastmem): memorise each puzzle's prompt text, then answer it greedily.
    fastmem_cfg = eval_cfg.get("fastmem")
    self.fastmem = None
    if fastmem_cfg is not None and fastmem_cfg.enabled:
      self.fastmem = fastmem_lib.FastMem(
          model_cfg, processor.tokenizer, fastmem_lib.FastMemConfig.from_config(fastmem_cfg),
          max_new_tokens=int(eval_cfg.max_new_tokens), eos_ids=eos_ids,
          pad_id=processor.pad_token_id, suppress_ids=self.sampler.cfg.sampling.suppress_ids,
          bucket=int(eval_cfg.prompt_bucket))
    self.decoding = ("greedy" if self.fastmem is None else
                     "fastmem+cd" if self.fastmem.fm.cd_alpha > 0 else "fastmem")

  def _fastmem_texts(self, params, puzzles, encoded) -> List[str]:
    """One puzzle at a time: each answer gets weights memorised on its own prompt text."""
    tokens = []
    for puzzle, prompt in zip(puzzles, encoded):
      (adapted,), _ = self.fastmem.memorize(params, puzzle.prompt)
      tokens += self.fastmem.decode(adapted, params, [prompt])
    return self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)

  def __call__(self, params, step: int) -> tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(records, samples): one record per test set, and every scored completion."""
    records, samples = [], []
    batch_size = int(self.eval_cfg.batch_size)
    metrics_lib.console(f"== eval at step {step}: {len(self.sets)} test set(s) of "
                        f"{self.eval_cfg.num_puzzles} puzzles, {self.decoding} ==")
    for spec, puzzles, encoded in self.sets:
      if self.fastmem is not None:
        texts = self._fastmem_texts(params, puzzles, encoded)
      else:
        texts = []
        for start in range(0, len(puzzles), batch_size):
          chunk = encoded[start:start + batch_size]
          chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape: pad the last batch
          batch = collate(chunk, self.processor.pad_token_id,
                                          int(self.eval_cfg.prompt_bucket))
          out = self.sampler.generate(params, batch, jax.random.key(0))
          texts += rollout_rewards.decode_completions(self.processor, out.tokens, out.mask)
      texts = texts[:len(puzzles)]
      scores = rollout_rewards.score_texts(puzzles, texts, 1)
      tokens = [len(self.processor.tokenizer(t, add_special_tokens=False)["input_ids"])
                for t in texts]
      records.append(dict(
          spec, step=int(step), decoding=self.decoding,
          accuracy=float(scores["correct"].mean()),
          score=float(scores["accuracy"].mean()), format_rate=float(scores["format"].mean()),
          mean_length=float(np.mean([len(t) for t in texts])), mean_tokens=float(np.mean(tokens)),
          n=len(puzzles)))
      for i, (puzzle, text) in enumerate(zip(puzzles, texts)):
        samples.append(dict(spec, step=int(step), puzzle=puzzle, completion=text,
                            correct=float(scores["correct"][i, 0]),
                            score=float(scores["accuracy"][i, 0]),
                            format=float(scores["format"][i, 0]), decoding=self.decoding))
    return records, samples


# -- reports ------------------------------------------------------------------------------------


PUZZLE_RECORDS = "eval_puzzles.jsonl"


def puzzle_record(sample: Dict[str, Any]) -> Dict[str, Any]:
  """One evaluated puzzle as JSON: what the policy was asked, what it answered, how it scored."""
  puzzle = sample["puzzle"]
  extracted = rewards_lib.extract_answer(sample["completion"], puzzle.answer_type, puzzle.think,
                                         puzzle.m, puzzle.n)
  solution = puzzle.solution
  return dict(
      step=sample["step"], size=sample["size"], question_type=sample["question_type"],
      think=sample["think"], decoding=sample.get("decoding", "greedy"),
      image_index=puzzle.source_index, prompt=puzzle.prompt, completion=sample["completion"],
      extracted=extracted, solution=solution if isinstance(solution, str) else list(
          map(int, solution)), accuracy=sample["correct"], score=sample.get("score"),
      format=sample.get("format"))


def append_puzzle_records(workdir: str, samples: Sequence[Dict[str, Any]]) -> str:
  """Appends one JSON line per evaluated puzzle to eval_puzzles.jsonl next to eval.json."""
  path = os.path.join(workdir, PUZZLE_RECORDS)
  os.makedirs(workdir, exist_ok=True)
  with open(path, "a") as f:
    for sample in samples:
      f.write(json.dumps(puzzle_record(sample)) + "\n")
  return path


def append_records(workdir: str, records: List[Dict[str, Any]],
                   samples: Optional[Sequence[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
  """Adds records to eval.json (replacing any of the same set and step) and rewrites the reports;
  with `samples`, their per-puzzle records go to eval_puzzles.jsonl."""
  if samples:
    append_puzzle_records(workdir, samples)
  path = os.path.join(workdir, "eval.json")
  existing = json.load(open(path)) if os.path.exists(path) else []
  key = lambda r: (r["size"], r["question_type"], r["think"], r["step"],
                   r.get("decoding", "greedy"))
  new_keys = {key(r) for r in records}
  merged = [r for r in existing if key(r) not in new_keys] + list(records)
  merged.sort(key=lambda r: (r["step"], r["question_type"], r["think"], r["size"]))
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(merged, f, indent=1)
  write_markdown(os.path.join(workdir, "eval.md"), merged)
  write_chart(os.path.join(workdir, "eval.png"), merged)
  return merged


def write_markdown(path: str, records: List[Dict[str, Any]]) -> None:
  lines = ["| step | decoding | question | think | size | accuracy | score | format | mean length "
           "| n |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['step']} | {r.get('decoding', 'greedy')} | {r['question_type']} | "
                 f"{r['think']} | {r['size']} | "
                 f"{100 * r['accuracy']:.1f} | {r['score']:.3f} | {100 * r['format_rate']:.1f} | "
                 f"{r['mean_length']:.1f} | {r['n']} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_chart(path: str, records: List[Dict[str, Any]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = sorted({(r["question_type"], r["think"]) for r in records})
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
  for ax, (question_type, think) in zip(axes[0], groups):
    rows = [r for r in records if (r["question_type"], r["think"]) == (question_type, think)]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    runs = sorted({(r["step"], r.get("decoding", "greedy")) for r in rows})  # a bar per run
    width = 0.8 / max(len(runs), 1)
    for i, (step, decoding) in enumerate(runs):
      values = [next((100 * r["accuracy"] for r in rows if r["size"] == s and r["step"] == step
                      and r.get("decoding", "greedy") == decoding), 0.0) for s in sizes]
      label = f"step {step}" + ("" if decoding == "greedy" else f" {decoding}")
      ax.bar(np.arange(len(sizes)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(runs) - 1) / 2, sizes)
    ax.set_ylim(0, 100)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"{question_type}, {'thinking' if think else 'non-thinking'}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_gallery(path: str, samples: List[Dict[str, Any]], per_kind: int = 4) -> Optional[str]:
  """Solved and failed puzzles side by side with the model's answer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  solved = [s for s in samples if s["correct"] == 1.0][:per_kind]
  failed = [s for s in samples if s["correct"] != 1.0][:per_kind]
  chosen = solved + failed
  if not chosen:
    return None
  fig, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 3.2), squeeze=False)
  for ax, s in zip(axes[0], chosen):
    puzzle = s["puzzle"]
    ax.imshow(puzzle.image)
    answer = " ".join(map(str, puzzle.solution)) if puzzle.question_type == "full" else (
        puzzle.solution)
    ax.set_title(f"{'solved' if s['correct'] == 1.0 else 'failed'} {puzzle.size} "
                 f"{puzzle.question_type}\nmodel: {s['completion'][:24]!r}\ntruth: {answer}",
                 fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


# -- the `eval` task -----------------------------------------------------------------------------


class PolicyWithProxy:
  """The Evaluator's sampler interface (`generate(params, batch, rng)`) for a frozen policy plus
  a Proxy-RLHF proxy: `params` is the pair (policy variables, proxy params)."""

  def __init__(self, sampler, deterministic: bool):
    self.sampler, self.deterministic = sampler, deterministic

  def generate(self, params, batch, rng):
    policy, proxy = params
    return self.sampler.generate(policy, proxy, batch, rng, deterministic=self.deterministic)


def proxy_sampler(config, evaluator: Evaluator, model_cfg, proxy_cfg) -> PolicyWithProxy:
  """Greedy proposals from the same plausible set as the proxy's training rollouts (so a
  rejection moves the answer to the next most likely token the policy finds plausible)."""
  r = config.rollout
  cfg = evaluator.sampler.cfg
  rollout = dataclasses.replace(cfg, sampling=dataclasses.replace(
      cfg.sampling, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p))
  return PolicyWithProxy(proxy_sampler_lib.ProxySampler(model_cfg, rollout, proxy_cfg),
                         bool(config.proxy.eval_deterministic))


def run(config, workdir: str):
  """Restores a run's parameters (its latest checkpoint, or `config.restore.step`) from
  `config.restore.workdir` (default: --workdir) and evaluates them on every test set: a full
  policy, adapters on their base, or a proxy steering its frozen base."""
  model_cfg = policy_lib.model_config(config.model)
  processor = policy_lib.processor(config.model)
  source = config.restore.workdir or workdir
  step, found = 0, None
  if config.restore.from_checkpoint:
    found = restore_lib.run_params(source, config, step=config.restore.step or None)
    model_cfg, params, step = found.model_cfg, found.variables, found.step
  else:
    params = policy_lib.initial_params(config.model, model_cfg, jax.random.key(config.seed))
  evaluator = Evaluator(model_cfg, processor, config.data, config.eval,
                        processor.special_ids.eos_ids)
  if found is not None and found.kind == restore_lib.PROXY:
    evaluator.sampler = proxy_sampler(found.config, evaluator, model_cfg, found.proxy_cfg)
    params = (params, found.proxy)
  records, samples = evaluator(params, step)
  append_records(workdir, records, samples)
  write_gallery(os.path.join(workdir, f"gallery_step{step}.png"), samples)
  print(metrics_lib.eval_table(records))
  return records
