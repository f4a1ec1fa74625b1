"""The settings every experiment shares: the paper's GRPO recipe and the CPU presets.

Experiment configs start from `base_config()` and change what differs; `apply_cpu_preset`
shrinks a config to the `tiny` / `small` CPU miniature. Every knob of a run is here (or in
`jigsaw_jax.data.config` for the input pipeline), documented where it is set.
"""

import ml_collections

from jigsaw_jax import data
from jigsaw_jax.runtime import sharding


def base_config() -> ml_collections.ConfigDict:
  """Jigsaw-R1's GRPO recipe on Qwen2.5-VL-3B (paper §4.3 and the reference's defaults)."""
  c = ml_collections.ConfigDict()
  c.task = "grpo"
  c.seed = 42  # HF Trainer's default seed, as in the reference runs
  c.init_from = ""  # another run's workdir: start from its latest params (SFT -> RL cold start)
  c.total_steps = 2000  # non-thinking runs; thinking runs use 1000

  # Policy: a preset shape with random weights, or a local HF checkpoint directory.
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen2_5_vl_3b", checkpoint="", dtype="bfloat16", param_dtype="float32",
      remat=True, attention_impl="xla"))

  # Input: COCO-like photos; the CPU presets switch to the bundled photos.
  c.data = data.default_config()
  c.data.source.image_size = None  # native size, as the reference feeds COCO
  c.data.pipeline.prompts_per_batch = 64  # prompts per optimizer step (global over processes)
  c.data.pipeline.group_size = 8  # G

  # Rollout: T=1, top-k 50, top-p 1, up to 512 new tokens.
  c.rollout = ml_collections.ConfigDict(dict(
      max_new_tokens=512, temperature=1.0, top_k=50, top_p=1.0, prompt_bucket=64))

  # GRPO: advantages (r - mean) / (std + 1e-4); per-sequence token-mean loss; k3 KL, beta 0.04.
  c.rl = ml_collections.ConfigDict(dict(
      advantage="grpo",  # grpo | dr_grpo | rloo
      loss="grpo",  # grpo | dr_grpo | bnpo | dapo | gspo (rl/grpo/losses.py; TRL's loss_type)
      epsilon_low=0.2, epsilon_high=0.2, beta=0.04, kl_estimator="k3",
      num_iterations=1,  # mu: updates per batch against the sampling policy's log-probs
      micro_batches=1,  # gradient accumulation within one optimizer step
      overlong_buffer=0,  # DAPO's soft overlong punishment window in tokens (0: off)
      # DAPO's dynamic sampling (rl/grpo/dynamic_sampling.py): draw batches until prompts_per_batch
      # groups differ in `dynamic_sampling_metric` (accuracy | total: accuracy + 0.5 * format),
      # at most max_draws per step; then `dynamic_sampling_at_cap`: fill (zero-variance groups
      # complete the batch) | raise (stop, as verl does). Off in the paper's runs.
      dynamic_sampling=False, max_draws=4, dynamic_sampling_metric="accuracy",
      dynamic_sampling_at_cap="fill",
      # Score each prompt once and share its KV cache with its G completions (same numbers, about
      # G times less prompt compute); False: every row runs its own copy of the prompt.
      share_prompt=True,
  ))

  # Rewards: 1.0 * accuracy + 0.5 * format, with the reference's rules (jigsaw_jax/puzzles/rewards.py).
  c.reward = ml_collections.ConfigDict(dict(
      connections=False,  # grid accuracy = correctly adjacent edges (reference option, off)
      binary_grid=False,  # grid accuracy = exact match (the paper's Table 9 ablation)
      require_permutation=False,  # no accuracy for a grid that repeats an index
  ))

  # AdamW, lr 1e-6 decaying linearly to 0, no warmup, no weight decay, clip 1.0.
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, end_learning_rate=0.0, warmup_steps=0, weight_decay=0.0,
      grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8,
      # A run stops (naming the step and its last good checkpoint) after this many updates in a
      # row were skipped for a non-finite gradient; 0: never stop.
      max_nonfinite_updates=5))

  # Evaluation: greedy decoding on fixed test sets of these sizes.
  c.eval = ml_collections.ConfigDict(dict(
      sizes=("2x1", "3x1", "4x1", "2x2"), question_types=("full",), thinks=(False,),
      num_puzzles=1000, seed=0, shuffle_mn=False, max_new_tokens=512, batch_size=32, prompt_bucket=64,
      every_steps=0, at_start=True, at_end=True))
  # FastMem (jigsaw_jax/fastmem/): before answering each puzzle, a few AdamW steps on the
  # likelihood of its prompt text (as an assistant turn), training only the last `layers` FFNs;
  # the paper's QA setting (lr 1e-5, 10 steps, KL weight 0.1). cd_alpha > 0 (paper: 0.5) decodes
  # (1 + a) z_mem - a z_orig (FastMem+CD).
  c.eval.fastmem = ml_collections.ConfigDict(dict(
      enabled=False, learning_rate=1e-5, steps=10, kl_weight=0.1, layers=1, cd_alpha=0.0,
      weight_decay=0.01, grad_clip=1.0, max_tokens=8192))

  c.checkpoint = ml_collections.ConfigDict(dict(
      subdir="checkpoints", save_every_steps=200, max_to_keep=3, async_save=True))
  c.metrics = ml_collections.ConfigDict(dict(log_every=1, samples_every=50))

  # Devices: (data, fsdp, tensor); -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1), dcn_shape=(), rules=[list(r) for r in sharding.DEFAULT_RULES]))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=1, process_id=0, auto_detect=False))

  # SFT (task="sft"): ground-truth answers, or the policy's own correct samples (thinking).
  c.sft = ml_collections.ConfigDict(dict(
      mode="ground_truth",  # ground_truth | rejection_sampling
      samples_per_prompt=8, target_length=16))
  # Evaluation of a finished run (task="eval"): which checkpoint to restore.
  c.restore = ml_collections.ConfigDict(dict(workdir="", step=0, from_checkpoint=True))

  # Trainable adapters on the frozen policy (jigsaw_jax/models/adapters): kind none | lora |
  # moe_lora | graph_moe. Only adapter parameters train and are checkpointed; the base comes from
  # model.preset/checkpoint (and pretrain / init_from) on every start.
  c.adapter = ml_collections.ConfigDict(dict(
      kind="none", rank=8, alpha=16.0, dropout=0.0,
      targets="q_proj|v_proj|gate_proj|up_proj|down_proj",  # regex over projection paths
      experts=4, top_k=2, expert_rank=0,  # expert_rank 0: same as rank
      attention_experts=False,  # MoE kinds: experts (not plain LoRA) on attention targets
      steps=2, combine="concat_proj", expert_input="token",  # GraphMoE's rethinking loop
      balance_coef=0.01, router_init_std=0.02))

  # A supervised stage before RL (the CPU miniature's base model); 0 steps: none.
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=0, batch_size=16, learning_rate=1e-3, warmup_steps=20,
      rotation_fraction=0.5,  # share of rotation-pretext examples
      splice_fraction=0.0,  # share of splice-detection examples (the rest: format only)
      target_length=8))
  return c


def apply_cpu_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """Shrinks a config to run on a laptop CPU: tiny model, bundled photos, small batches."""
  if preset not in ("tiny", "small"):
    raise ValueError(f"Unknown CPU preset {preset!r}; expected 'tiny' or 'small'.")
  c.model.preset = preset
  c.model.dtype = "float32"
  c.model.remat = False
  c.data.source.kind = "bundled"
  c.data.source.image_size = (84, 84)
  c.data.pipeline.resize_to = (84, 84)
  c.data.pipeline.prompts_per_batch = 8
  c.rollout.max_new_tokens = 8
  c.rollout.prompt_bucket = 16
  c.eval.num_puzzles = 200
  c.eval.max_new_tokens = 8
  c.eval.batch_size = 50
  c.eval.prompt_bucket = 16
  c.checkpoint.save_every_steps = 25
  c.metrics.samples_every = 25
  c.mesh.shape = (1, -1, 1)


def apply_miniature(c: ml_collections.ConfigDict) -> None:
  """The CPU miniature of the paper's finding: a base at chance becomes near-perfect by RL.

  Learning rates and KL are much larger than the paper's because the policy is tiny and starts
  from a short pretraining stage instead of a 3B instruct model (see jigsaw_jax/sft/pretrain.py).
  """
  c.total_steps = 1200
  c.model.preset = "tiny_jigsaw"  # no patch merging: the 2x1 seam falls inside a patch
  # 198 = 9 patches of 22: nine patches straddle the seam, each 22 pixels wide. Measured with
  # supervised answers (800 steps of 32, 128 held-out puzzles each): 2x1 83% at 98 pixels in
  # patches of 14, 91% at 126 (14), 94% at 162 (18), 96% at 198 (22).
  c.data.source.image_size = c.data.pipeline.resize_to = (198, 198)
  # The tiny policy reads no English: the paper's ~130-token wording would be a constant prefix
  # costing most of each step. Same information, a quarter of the tokens (puzzles/prompts.py).
  c.data.pipeline.puzzle.prompt_style = "compact"
  # Crops flat enough to hide the seam (bokeh, night sky) are redrawn; the starfield photo is a
  # texture with no up or down, on which a 2x1 jigsaw has no visible answer.
  c.data.source.min_detail = 8.0
  # Train crops at the test crops' pixel scale (see BundledSource): measured with supervised
  # answers, the gap between train and held-out accuracy narrows.
  c.data.source.same_scale = True
  c.data.source.photos = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                          "motorcycle_right", "retina", "immunohistochemistry", "china",
                          "flower", "grace_hopper")
  c.optim.learning_rate = 1e-3
  c.optim.end_learning_rate = 1e-4
  c.optim.warmup_steps = 10
  c.data.pipeline.prompts_per_batch = 16
  # With no KL the policy drifts to one confident answer per image before it sees anything, every
  # group of G then agrees and the advantage is 0 everywhere; the KL to the even-handed base keeps
  # the groups mixed (measured: beta 0 -> all groups zero-variance within 25 steps).
  c.rl.beta = 0.1
  # Past ~85% most groups of 8 agree (all right, or all wrong) and carry no signal: 80% of them
  # at the end of a 2100-step run. Drawing until all 16 groups differ (rollouts cost a fifth of
  # an update here) reached 2x1 89.0% / 1x2 94.0% in 1300 steps against 87.0% / 89.0% in 2100
  # without (same pretrained base). Temperature 1.5 or beta 0.02 on top were not better.
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 4
  # Fractional grid accuracy without a permutation check pays "2 2" a sure 0.5: a policy that does
  # not yet see the answer drifts there. Binary accuracy (paper Table 9) has no such fixed point.
  c.reward.binary_grid = True
  c.eval.sizes = ("2x1", "1x2", "3x1")
  c.eval.every_steps = 400
  # The base: answer format plus the splice pretext, which teaches the vision tower to see a seam
  # between two photos (sft/pretrain.py). With splices on half of the 32 rows (198 pixels) the
  # loss stayed flat for 650 steps and held-out splice accuracy was 72% after 800; on three
  # quarters it falls from step ~300, is flat again from ~500, and splice accuracy was 98% after
  # 800 (64 held-out examples); the format needs few rows. The rotation pretext stayed at chance
  # in our budget and is left out.
  c.pretrain.steps = 500
  c.pretrain.batch_size = 32
  c.pretrain.rotation_fraction = 0.0
  c.pretrain.splice_fraction = 0.75
