"""One GRPO step, ours against TRL's `GRPOTrainer`, on the same tiny Qwen2.5-VL checkpoint.

  python benchmarks/grpo_step.py [--peer auto|trl|torch] [--steps 8] [--warmup 1]
                                 [--prompts 4] [--group 8] [--new-tokens 32] [--image-size 112]
                                 [--no-share-prompt]

The workload is the paper's step at toy scale: 4 jigsaw prompts (full 2x1, one puzzle image each,
112x112) x G=8 samples, 32 new tokens forced (EOS and the vision placeholders are suppressed on
both sides, so every completion is exactly 32 tokens), T=1, top-k 50; the Jigsaw-R1 reward
(1.0 * accuracy + 0.5 * format, our `score_completion`); GRPO advantages; the per-sequence
token-mean loss with the k3 KL at beta=0.04 against the initial policy (so a reference forward is
part of every step); AdamW at lr 1e-6, global-norm clip 1.0; one optimizer step over all 32 rows.

Peers (PyTorch on 2 threads, float32, no gradient checkpointing on either side; OpenMP waiters
sleep (OMP_WAIT_POLICY=PASSIVE) because spinning ones made TRL 5-10x slower on a shared machine):

* `trl`   : TRL's GRPOTrainer (use_vllm=False, bf16=False, loss_type="grpo", logging off), handed
            a Qwen2_5_VLProcessor built from the checkpoint's tokenizer and image processor without
            the video processor (the stock AutoProcessor needs torchvision).
* `torch` : transformers' `generate` plus a hand-written PyTorch GRPO loss, backward and AdamW
            step on the same model (the fallback when TRL cannot run the workload).
* `auto`  : `trl`, and if TRL cannot be imported or fails on the workload, says exactly why and
            runs `torch` instead.

Each side runs `--warmup` steps, then `--steps` timed steps on fresh prompts; our step i runs
right after the peer's step i (untimed for the peer), so both see the same machine load. Our first
step's extra time is the one-off compilation, reported apart. Steps are split into rollout (prompt
encoding + generation), reward (decode + score + advantages) and update (everything else: the
reference and policy forwards, backward, optimizer). Our update runs each prompt once for its G
samples (rl/scoring.py `shared_prompt_scores`); `--no-share-prompt` scores every row on its own, as
TRL does. The last line is `speedup_vs_<peer>=<ratio>` of median seconds per step (peer / ours).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's OpenMP threads spin while they wait. On a machine shared with other jobs (more runnable
# threads than cores) that made TRL's steps 5-10x slower with 2 threads than with 1; sleeping
# waiters keep the peer at its real speed. Set OMP_WAIT_POLICY=ACTIVE to measure the other way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PHASES = ("rollout", "reward", "update")


class PeerUnavailable(RuntimeError):
  """The peer cannot run this workload; the message says why."""


@dataclasses.dataclass
class Workload:
  prompts: int = 4
  group: int = 8
  new_tokens: int = 32
  image_size: int = 112
  beta: float = 0.04
  learning_rate: float = 1e-6
  temperature: float = 1.0
  top_k: int = 50
  warmup: int = 1
  steps: int = 8
  prompt_bucket: int = 16  # ours pads prompts to a multiple (the `:tiny` configs' value)
  share_prompt: bool = True  # ours: the update runs each prompt once for its G samples

  @property
  def total_steps(self) -> int:
    return self.warmup + self.steps


@dataclasses.dataclass
class Result:
  name: str
  steps: List[Dict[str, float]]  # per timed step: seconds per phase and 'total'
  lengths: List[float]  # mean completion length per timed step
  compile_s: Optional[float] = None
  note: str = ""

  def median(self, key: str) -> float:
    values = [s[key] for s in self.steps if key in s]
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# The shared checkpoint and puzzles.
# ---------------------------------------------------------------------------------------------


def build_checkpoint(preset: str, directory: str) -> None:
  """A random-weight HF Qwen2.5-VL checkpoint with its tokenizer and image processor."""
  import torch
  import transformers
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
  from jigsaw_jax.models import hf_io, presets
  from jigsaw_jax.models import tokenizer as tokenizer_lib
  from jigsaw_jax.models.processing import ImageProcessingConfig
  torch.manual_seed(0)
  cfg = presets.get_preset(preset)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_io.hf_config_from_model_config(cfg))
  model.save_pretrained(directory)
  tokenizer_lib.load_tokenizer(None).save_pretrained(directory)
  image = ImageProcessingConfig()
  image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=image.min_pixels, max_pixels=image.max_pixels, patch_size=image.patch_size,
      merge_size=image.merge_size, temporal_patch_size=image.temporal_patch_size,
      image_mean=list(image.image_mean), image_std=list(image.image_std)).save_pretrained(directory)


def make_puzzles(work: Workload, seed: int = 0):
  """The prompts of every step: a list (one per step) of `work.prompts` puzzles."""
  from jigsaw_jax.puzzles import PuzzleSpec, make_puzzle, puzzle_rng
  rng = np.random.default_rng(seed)
  spec = PuzzleSpec(m=2, n=1, question_type="full")
  batches = []
  for step in range(work.total_steps):
    batch = []
    for i in range(work.prompts):
      image = rng.integers(0, 256, (work.image_size, work.image_size, 3), dtype=np.uint8)
      batch.append(make_puzzle(image, spec, puzzle_rng(seed, step * work.prompts + i)))
    batches.append(batch)
  return batches


def score_one(puzzle, text: str):
  from jigsaw_jax.puzzles import score_completion
  return score_completion(text, puzzle.answer_type, puzzle.solution, puzzle.think, puzzle.m,
                          puzzle.n, prefill_think=puzzle.think and not puzzle.instruct_model)


def suppressed_ids(directory: str) -> tuple:
  """Vision placeholders (never sampled, as in training) and EOS (so 32 tokens are forced)."""
  from jigsaw_jax.models import hf_io
  from jigsaw_jax.models.processing import Processor
  cfg = hf_io.model_config_from_hf(hf_io.read_config(directory))
  eos = Processor.from_pretrained(directory).special_ids.eos_ids
  return tuple(sorted({cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                       cfg.vision_end_token_id, *eos}))


# ---------------------------------------------------------------------------------------------
# Ours: the trainer's step (jigsaw_jax/rl/grpo/train.py, the loop body) on the same pieces.
# ---------------------------------------------------------------------------------------------


class Ours:
  """The trainer's own step (jigsaw_jax/rl/grpo/step.py `GrpoStep`) on the same pieces, one call
  per step, so that it can run interleaved with the peer's steps (same machine load)."""

  def __init__(self, directory: str, work: Workload):
    import jax
    import jax.numpy as jnp
    from jigsaw_jax.models import hf_io
    from jigsaw_jax.models.processing import Processor
    from jigsaw_jax.rl.grpo import losses as losses_lib
    from jigsaw_jax.rl import rollout_rewards
    from jigsaw_jax.rl.grpo.step import GrpoConfig, GrpoStep
    from jigsaw_jax.rl.optim import make_optimizer
    from jigsaw_jax.rl.policy_steps import PolicySteps
    from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
    from jigsaw_jax.generate.sampling import SamplingConfig

    self.work = work
    params, self.cfg = hf_io.load_hf(directory)
    processor = Processor.from_pretrained(directory)
    sampler = Sampler(self.cfg, RolloutConfig(
        max_new_tokens=work.new_tokens, group_size=work.group,
        sampling=SamplingConfig(temperature=work.temperature, top_k=work.top_k, top_p=1.0,
                                suppress_ids=suppressed_ids(directory)),
        eos_ids=processor.special_ids.eos_ids, pad_id=processor.pad_token_id))
    loss_cfg = losses_lib.LossConfig(name="grpo", beta=work.beta, kl_estimator="k3",
                                     max_completion_length=work.new_tokens)
    optimizer = make_optimizer(work.learning_rate, work.total_steps)
    steps = PolicySteps(self.cfg, loss_cfg, optimizer, work.temperature,
                        share_prompt=work.share_prompt)
    # The update donates the params' buffers, so the KL reference gets its own copy.
    ref_params = jax.tree_util.tree_map(jnp.copy, params) if work.beta else None
    self.step_fn = GrpoStep(
        GrpoConfig(group_size=work.group, prompt_bucket=work.prompt_bucket,
                   max_new_tokens=work.new_tokens, advantage="grpo", beta=work.beta),
        steps, sampler, processor, rollout_rewards.score_texts, ref_params=ref_params)
    self.rng = jax.random.key(0)
    self.state = self.step_fn.init_state(params, self.rng)
    self.times: List[Dict[str, float]] = []
    self.lengths: List[float] = []
    self.last = ""

  def step(self, index: int, puzzles) -> None:
    import jax
    from jigsaw_jax.runtime.metrics import StepTimer
    group = self.work.group
    timer = StepTimer()
    batch = {"puzzle": [p for p in puzzles for _ in range(group)]}  # the pipeline's layout
    self.state, metrics, records = self.step_fn(
        self.state, iter([batch]), jax.random.fold_in(self.rng, index), timer)
    phases = timer.finish_step()
    self.times.append({"rollout": phases["time/data_s"] + phases["time/rollout_s"],
                       "reward": phases["time/reward_s"], "update": phases["time/update_s"],
                       "total": phases["time/step_s"]})
    self.lengths.append(float(records.groups.mask.sum(-1).mean()))
    self.last = (f"loss {metrics['loss']:.4f}, grad norm {metrics['grad_norm']:.3g}")

  def result(self) -> Result:
    warm = self.work.warmup
    result = Result("ours (jax)", self.times[warm:], self.lengths[warm:])
    first = self.times[0]
    result.compile_s = first["total"] - result.median("total")
    result.note = (f"first step {first['total']:.1f} s (rollout {first['rollout']:.1f}, update "
                   f"{first['update']:.1f}); last: {self.last}")
    return result


# ---------------------------------------------------------------------------------------------
# Peer 1: TRL's GRPOTrainer.
# ---------------------------------------------------------------------------------------------


def _image_only_processor(directory: str):
  """Qwen2_5_VLProcessor from the checkpoint's tokenizer and image processor, minus the video
  processor (transformers builds that with torchvision, which is not installed)."""
  import transformers
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

  class ImageOnlyQwen25VLProcessor(transformers.Qwen2_5_VLProcessor):

    @classmethod
    def get_attributes(cls):
      return ["image_processor", "tokenizer"]

  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, padding_side="left")
  image_processor = image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(
      directory)
  return ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template)


def _trl_reward_functions(batches) -> List[Callable]:
  """Accuracy and format as TRL reward functions (weighted 1.0 and 0.5 in the config).

  Each dataset row carries `puzzle_id`; the functions look the puzzle up and score the completion
  with our `score_completion`, exactly as our trainer does."""
  by_id = {f"{s}:{i}": p for s, batch in enumerate(batches) for i, p in enumerate(batch)}

  def text_of(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion

  def accuracy(prompts, completions, puzzle_id, **kwargs):
    return [score_one(by_id[k], text_of(c)).accuracy for c, k in zip(completions, puzzle_id)]

  def format_reward(prompts, completions, puzzle_id, **kwargs):
    return [score_one(by_id[k], text_of(c)).format for c, k in zip(completions, puzzle_id)]

  accuracy.__name__, format_reward.__name__ = "jigsaw_accuracy", "jigsaw_format"
  return [accuracy, format_reward]


def run_trl(directory: str, work: Workload, batches, between: Callable[[int], None]) -> Result:
  """TRL's steps; `between(i)` runs after TRL's step i and is not counted in TRL's time."""
  try:
    import datasets
    import PIL.Image
    import transformers
    import trl
  except ImportError as e:
    raise PeerUnavailable(f"TRL cannot be imported ({type(e).__name__}: {e}); install it with "
                          "`pip install trl` (1.16 was measured) or use --peer=torch.") from e

  try:
    processor = _image_only_processor(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise PeerUnavailable(
        "cannot build an image-only Qwen2_5_VLProcessor from the checkpoint's tokenizer and "
        f"image processor with transformers {transformers.__version__}: "
        f"{type(e).__name__}: {e}") from e

  rows = []
  for s, batch in enumerate(batches):
    for i, p in enumerate(batch):
      rows.append({
          "prompt": [{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": p.prompt}]}],
          "image": PIL.Image.fromarray(p.image), "puzzle_id": f"{s}:{i}"})
  dataset = datasets.Dataset.from_list(rows)
  rows_per_step = work.prompts * work.group
  suppress = list(suppressed_ids(directory))
  config_kwargs = dict(
      output_dir=os.path.join(directory, "trl_output"), seed=0, use_cpu=True,
      max_steps=work.total_steps, per_device_train_batch_size=rows_per_step,
      gradient_accumulation_steps=1, num_generations=work.group,
      max_completion_length=work.new_tokens, temperature=work.temperature, top_k=work.top_k,
      top_p=1.0, beta=work.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2,
      learning_rate=work.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
      weight_decay=0.0, max_grad_norm=1.0, reward_weights=[1.0, 0.5],
      generation_kwargs={"min_new_tokens": work.new_tokens, "suppress_tokens": suppress},
      use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False,
      shuffle_dataset=False, report_to=[], logging_strategy="no", save_strategy="no",
      log_completions=False, disable_tqdm=True, dataloader_num_workers=0)
  try:
    args = trl.GRPOConfig(**config_kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise PeerUnavailable(f"trl {trl.__version__} rejects the GRPOConfig of this workload: "
                          f"{type(e).__name__}: {e}") from e

  clock = {"rollout": 0.0, "reward": 0.0}
  marks: List[float] = []  # when each TRL step starts (after the previous `between`)
  ends: List[float] = []
  lengths: List[float] = []
  seen_prompts: List[List[List[int]]] = []  # the prompt ids TRL generated from, per step
  splits: List[Dict[str, float]] = []
  ours_failed: List[Exception] = []

  class TimedGRPOTrainer(trl.GRPOTrainer):
    """Times generation and reward scoring (private hooks: if a future TRL renames them, the
    split is reported as missing, the step time is unaffected)."""

    def _generate(self, prompts):
      start = time.perf_counter()
      out = super()._generate(prompts)
      clock["rollout"] += time.perf_counter() - start
      try:  # TRL 1.16 returns (prompt_ids, completion_ids, ...); never fail TRL's step over it.
        lengths.append(float(np.mean([len(c) for c in out[1]])))
        seen_prompts.append([list(map(int, ids)) for ids in out[0]])
      except Exception:  # pylint: disable=broad-except
        pass
      return out

    def _calculate_rewards(self, *a, **k):
      start = time.perf_counter()
      out = super()._calculate_rewards(*a, **k)
      clock["reward"] += time.perf_counter() - start
      return out

  class StepClock(transformers.TrainerCallback):

    def on_train_begin(self, args, state, control, **kwargs):
      marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      ends.append(time.perf_counter())
      splits.append(dict(clock))
      try:
        between(len(ends) - 1)
      except Exception as e:  # pylint: disable=broad-except
        ours_failed.append(e)  # ours, not TRL: re-raised as is after train()
        control.should_training_stop = True
      clock.update(rollout=0.0, reward=0.0)
      marks.append(time.perf_counter())

  try:
    trainer = TimedGRPOTrainer(
        model=directory, reward_funcs=_trl_reward_functions(batches), args=args,
        train_dataset=dataset, processing_class=processor, callbacks=[StepClock()])
  except Exception as e:  # pylint: disable=broad-except
    raise PeerUnavailable(f"trl {trl.__version__} GRPOTrainer cannot be built for this workload: "
                          f"{type(e).__name__}: {e}") from e
  trainer.remove_callback(transformers.PrinterCallback)  # logging off: no end-of-run dict
  if getattr(trainer, "ref_model", None) is None and work.beta:
    raise PeerUnavailable(f"trl {trl.__version__} built no reference model although beta="
                          f"{work.beta}; the step would not include the reference forward.")
  try:
    trainer.train()
  except Exception as e:  # pylint: disable=broad-except
    where = traceback.extract_tb(e.__traceback__)[-1]
    raise PeerUnavailable(
        f"trl {trl.__version__} GRPOTrainer.train() failed on this workload at "
        f"{os.path.basename(where.filename)}:{where.lineno} ({where.name}): "
        f"{type(e).__name__}: {e}") from e
  if ours_failed:
    raise ours_failed[0]
  if len(ends) != work.total_steps:
    raise PeerUnavailable(f"trl ran {len(ends)} optimizer steps, expected {work.total_steps}.")
  timed = []
  for i in range(work.warmup, work.total_steps):
    total = ends[i] - marks[i]
    times = {"total": total}
    if len(splits) == work.total_steps and len(lengths) == work.total_steps:
      times.update(rollout=splits[i]["rollout"], reward=splits[i]["reward"],
                   update=total - splits[i]["rollout"] - splits[i]["reward"])
    timed.append(times)
  step_lengths = lengths[work.warmup:] if len(lengths) == work.total_steps else []
  result = Result(f"trl {trl.__version__} GRPOTrainer", timed, step_lengths)
  result.note = (f"first step {ends[0] - marks[0]:.1f} s; "
                 f"{_same_prompts(directory, batches, seen_prompts)}")
  return result


def _same_prompts(directory: str, batches, seen_prompts) -> str:
  """Whether TRL generated from exactly the token ids our processor gives (G copies each)."""
  from jigsaw_jax.models.processing import Processor
  if len(seen_prompts) != len(batches):
    return "prompt ids not checked (TRL's _generate was not seen)"
  processor = Processor.from_pretrained(directory)
  group = len(seen_prompts[0]) // len(batches[0])
  for batch, seen in zip(batches, seen_prompts):
    ours = [processor.encode_prompt(p.prompt, p.image).input_ids.tolist() for p in batch]
    if [row for row in ours for _ in range(group)] != seen:
      return "WARNING: TRL's prompt ids differ from ours"
  return "prompt ids identical to ours"


# ---------------------------------------------------------------------------------------------
# Peer 2 (fallback): transformers `generate` + a PyTorch GRPO loss, backward and AdamW.
# ---------------------------------------------------------------------------------------------


def run_torch(directory: str, work: Workload, batches, between: Callable[[int], None]
              ) -> Result:
  """The fallback peer's steps; `between(i)` runs after step i, untimed."""
  import torch
  import transformers
  from jigsaw_jax.models.processing import Processor, collate
  from jigsaw_jax.rl import rollout_rewards

  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      directory, dtype=torch.float32)
  ref_model = copy.deepcopy(model).eval().requires_grad_(False)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=work.learning_rate, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: max(0.0, 1.0 - s / max(work.total_steps, 1)))
  processor = Processor.from_pretrained(directory)
  image_token = model.config.image_token_id
  pad_id = processor.pad_token_id
  generation = transformers.GenerationConfig(
      do_sample=True, temperature=work.temperature, top_k=work.top_k, top_p=1.0,
      max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens,
      eos_token_id=list(processor.special_ids.eos_ids), pad_token_id=pad_id,
      suppress_tokens=list(suppressed_ids(directory)), num_return_sequences=work.group)

  def completion_logps(net, ids, attn, pixels, grid, completion):
    t = completion.shape[1]
    out = net(input_ids=ids, attention_mask=attn, pixel_values=pixels, image_grid_thw=grid,
              mm_token_type_ids=(ids == image_token).long(), logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / work.temperature
    return torch.gather(logits.log_softmax(-1), 2, completion[..., None])[..., 0]

  timed, lengths, first = [], [], None
  for step, puzzles in enumerate(batches):
    t0 = time.perf_counter()
    batch = collate([processor.encode_prompt(p.prompt, p.image) for p in puzzles], pad_id)
    ids = torch.tensor(batch.input_ids, dtype=torch.long)
    attn = torch.tensor(batch.attention_mask, dtype=torch.long)
    pixels = torch.tensor(batch.pixel_values)
    grid = torch.tensor(batch.image_grid_thw, dtype=torch.long)
    with torch.no_grad():
      model.eval()
      out = model.generate(input_ids=ids, attention_mask=attn, pixel_values=pixels,
                           image_grid_thw=grid, mm_token_type_ids=(ids == image_token).long(),
                           generation_config=generation)
      model.train()
    completion = out[:, ids.shape[1]:]
    is_eos = torch.isin(completion, torch.tensor(processor.special_ids.eos_ids))
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    t1 = time.perf_counter()
    texts = rollout_rewards.decode_completions(processor, completion.numpy(), mask.numpy() > 0)
    rewards = torch.tensor(rollout_rewards.score_texts(puzzles, texts, work.group)["total"])
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4))
    adv = adv.reshape(-1, 1)
    t2 = time.perf_counter()
    rows_ids = torch.cat([ids.repeat_interleave(work.group, 0), completion], 1)
    rows_attn = torch.cat([attn.repeat_interleave(work.group, 0), mask.long()], 1)
    patches = grid.prod(-1).tolist()
    rows_pixels = torch.cat([p for p in torch.split(pixels, patches) for _ in range(work.group)])
    rows_grid = grid.repeat_interleave(work.group, 0)
    with torch.no_grad():
      ref_logp = completion_logps(ref_model, rows_ids, rows_attn, rows_pixels, rows_grid,
                                  completion)
    logp = completion_logps(model, rows_ids, rows_attn, rows_pixels, rows_grid, completion)
    ratio = torch.exp(logp - logp.detach())
    per_token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    log_ratio = ref_logp - logp
    per_token = per_token + work.beta * (torch.exp(log_ratio) - log_ratio - 1.0)
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    t3 = time.perf_counter()
    times = {"rollout": t1 - t0, "reward": t2 - t1, "update": t3 - t2, "total": t3 - t0}
    first = first or times
    if step >= work.warmup:
      timed.append(times)
      lengths.append(float(mask.sum(1).mean()))
    between(step)
  result = Result(f"torch {torch.__version__} generate + loss", timed, lengths)
  result.note = (f"first step {first['total']:.1f} s; loss {loss.item():.4f}, grad norm "
                 f"{grad_norm.item():.3g}")
  return result


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def print_table(results: Sequence[Result], work: Workload) -> None:
  tokens = work.prompts * work.group * work.new_tokens
  print("| side | s/step | tokens/s | rollout s | rollout tok/s | reward s | update s | "
        "mean completion len | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    total = r.median("total")
    split = [f"{r.median(p):.3f}" if any(p in s for s in r.steps) else "n/a" for p in PHASES]
    rollout_rate = (f"{tokens / r.median('rollout'):,.0f}"
                    if any("rollout" in s for s in r.steps) else "n/a")
    split.insert(1, rollout_rate)
    length = f"{statistics.mean(r.lengths):.1f}" if r.lengths else "n/a"
    compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
    print(f"| {r.name} | {total:.3f} | {tokens / total:,.0f} | {' | '.join(split)} | {length} | "
          f"{compile_s} |")
  print()
  for r in results:
    spread = ", ".join(f"{s['total']:.3f}" for s in r.steps)
    print(f"{r.name}: steps [{spread}] s; {r.note}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer", choices=("auto", "trl", "torch"), default="auto")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=112)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
  parser.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                      help="ours scores every row's prompt on its own (as before sharing)")
  args = parser.parse_args(argv)
  work = Workload(prompts=args.prompts, group=args.group, new_tokens=args.new_tokens,
                  image_size=args.image_size, warmup=args.warmup, steps=args.steps,
                  share_prompt=args.share_prompt)

  import torch
  torch.set_num_threads(args.threads)
  directory = tempfile.mkdtemp(prefix="grpo_step_ckpt_")
  try:
    return _compare(args, work, directory)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def _compare(args, work: Workload, directory: str) -> Dict[str, float]:
  import jax
  import torch
  import transformers
  build_checkpoint(args.preset, directory)
  batches = make_puzzles(work)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; transformers {transformers.__version__}; preset "
        f"{args.preset}; {work.prompts} prompts x G={work.group}; {work.new_tokens} new tokens "
        f"forced; images {work.image_size}px; beta={work.beta}; {work.warmup} warm-up + "
        f"{work.steps} timed steps; ours shares prompts: {work.share_prompt}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

  # Our steps run between the peer's (step i of each, alternately), so both see the same load.
  ours = Ours(directory, work)
  between = lambda i: ours.step(i, batches[i])
  peer_result, peer_name = None, args.peer
  if args.peer in ("auto", "trl"):
    try:
      peer_result, peer_name = run_trl(directory, work, batches, between), "trl"
    except PeerUnavailable as e:
      if args.peer == "trl":
        raise
      print(f"TRL peer unavailable: {e}")
      print("Falling back to --peer=torch: transformers generate + a PyTorch GRPO loss/backward.")
      ours = Ours(directory, work)  # afresh: the failed attempt may have run some of our steps
  if peer_result is None:
    peer_result, peer_name = run_torch(directory, work, batches, between), "torch"
  ours_result = ours.result()

  print()
  print_table([peer_result, ours_result], work)
  speedup = peer_result.median("total") / ours_result.median("total")
  print(f"load average at the end {os.getloadavg()[0]:.1f}: other jobs on these cores slow both "
        "sides, so absolute times drift; the ratio is from interleaved steps.")
  print()
  print(f"speedup_vs_{peer_name}={speedup:.2f}")
  return {"speedup": speedup}


if __name__ == "__main__":
  main()
