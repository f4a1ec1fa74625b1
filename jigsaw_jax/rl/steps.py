"""The jitted pieces of a policy update, as pure functions of pytrees.

    steps = PolicySteps(model_cfg, loss_cfg, optimizer, temperature)
    logp, entropy = steps.score(params, seq)                # per completion token, no gradient
    grads, loss, metrics = steps.grads(params, seq, advantages, old_logp, ref_logp)
    params, opt_state, stats = steps.apply_update(params, opt_state, grads)

A step accumulates gradients over micro-batches (a host loop over the jitted gradient, so images
of any size work) and applies one optax update. The update refuses a non-finite gradient: the
parameters and optimizer state stay as they were and `stats['finite']` is 0, so a bad step never
reaches a checkpoint.

On a device mesh every jit gets explicit in/out shardings: params and optimizer state where the
logical-axis rules put them (FSDP, tensor parallelism), the rows of every batch array split over
the data-like axes ('data', 'fsdp'), scalars replicated; the model is traced under the mesh and
the rules, so its activation constraints apply. The numbers are the one-device numbers up to
float summation order (tests/test_scale_out.py checks four meshes and two processes).

    steps = PolicySteps(model_cfg, loss_cfg, optimizer, mesh=mesh, rules=config.mesh.rules)
    params = ...created with out_shardings=steps.param_shardings...
    opt_state = steps.init_optimizer(params)                # created already sharded
    seq = steps.shard_batch(seq)                            # this process's rows -> global arrays

Rows that come in groups sharing a prompt (`seq.group` = G, as `build_sequences` makes them) are
scored with the prompt run once per group and its KV cache shared by the G completions
(`shared_prompt_scores`): the same numbers, ~G times less prompt work. `share_prompt=False`, G = 1,
or a mesh whose data-like axes do not divide the number of prompts use the row-by-row pass.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jigsaw_jax import sharding as sharding_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import decoder as decoder_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.rl import losses
from jigsaw_jax.rl.sequences import SequenceBatch


def _array_fields(seq: SequenceBatch):
  return (seq.input_ids, seq.attn_mask, seq.positions,
          seq.pixel_values if seq.grid else None, seq.completion, seq.completion_mask)


def completion_scores(model: mllm.VisionLanguageModel, params, input_ids, attn_mask, positions,
                      pixel_values, completion, grid, temperature: float, *,
                      adapters_enabled: bool = True, rngs=None, with_aux: bool = False,
                      group: int = 1):
  """log p(completion token) and the entropy at each completion position, float32 [R, T].

  Logits are computed only at the T positions that predict completion tokens, so the [R, L+T, V]
  tensor over the whole sequence is never materialised. With adapters: `adapters_enabled=False`
  scores the base alone, `rngs={'dropout': key}` turns on adapter dropout, and `with_aux` also
  returns the mean MoE balance loss (0 without experts) as a third value.

  `group` > 1 says that rows g*G ... g*G + G-1 share one prompt (and its images), as
  `build_sequences` lays them out: the vision tower and the prompt then run once per distinct
  prompt (`shared_prompt_scores`), the same numbers up to float rounding.
  """
  if group > 1:
    return shared_prompt_scores(model, params, input_ids, attn_mask, positions, pixel_values,
                                completion, grid, temperature, group,
                                adapters_enabled=adapters_enabled, rngs=rngs, with_aux=with_aux)
  t = completion.shape[1]
  out = model.apply(params, input_ids, positions, attn_mask, pixel_values, grid or None,
                    return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled,
                    rngs=rngs, mutable=[adapters_lib.LOSSES] if with_aux else False)
  out, state = out if with_aux else (out, {})
  hidden = out.hidden[:, -t - 1:-1]
  logits = model.apply(params, hidden, method=lambda m, h: m.decoder.logits(h))
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores


def _first_of_group_patches(grid, rows: int, group: int):
  """(indices, grids) of the images of every group's first row: which patches of `pixel_values`
  (all rows' images, in row order) they are (None: equal images, a reshape picks them)."""
  per_row = len(grid) // rows
  firsts = [i for p in range(rows // group) for i in range(p * group * per_row,
                                                           p * group * per_row + per_row)]
  prompt_grid = tuple(grid[i] for i in firsts)
  sizes = [int(np.prod(g)) for g in grid]
  if len(set(sizes)) <= 1:
    return None, prompt_grid  # Equal images: a reshape picks them, which shards cleanly.
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in firsts])
  return index.astype(np.int32), prompt_grid


def shared_prompt_scores(model: mllm.VisionLanguageModel, params, input_ids, attn_mask,
                         positions, pixel_values, completion, grid, temperature: float,
                         group: int, *, adapters_enabled: bool = True, rngs=None,
                         with_aux: bool = False):
  """`completion_scores` with the G rows of a group sharing their prompt's forward pass.

  The prompt (first row of each group, images included) fills a KV cache, which the G rows of its
  group read as a shared prefix while the completion tokens but the last run after it, at the
  positions `build_sequences` gave them. The prompt's last hidden state
  predicts completion token 0, the completion's own hidden states the rest. Gradients reach the
  prompt through the shared prefix (summed over the group), so loss and grads are those of the
  unshared pass. Prompts (image tokens and instructions) are most of a GRPO batch's tokens, so
  this does close to G times less work.

  With MoE adapters the balance loss is sown once by the prompt pass and once by the completion
  pass and `balance_loss` averages the two Switch losses, where the unshared pass computes one
  over all positions (prompt rows counted G times): the regulariser differs slightly; log-probs,
  entropies and the policy loss do not.
  """
  rows, t = completion.shape
  length = input_ids.shape[1] - t
  prompts = rows // group
  first = lambda x, axis=0: jax.lax.index_in_dim(
      x.reshape(x.shape[:axis] + (prompts, group) + x.shape[axis + 1:]), 0, axis + 1, False)
  prompt_ids = first(input_ids)[:, :length]
  prompt_mask = first(attn_mask)[:, :length]
  prompt_positions = first(positions, positions.ndim - 2)[..., :length]  # M-RoPE: [3, R, L+T]
  prompt_pixels, prompt_grid = None, ()
  if grid:
    index, prompt_grid = _first_of_group_patches(grid, rows, group)
    if index is None:
      prompt_pixels = first(pixel_values.reshape(rows, -1, pixel_values.shape[-1]))
      prompt_pixels = prompt_pixels.reshape(-1, pixel_values.shape[-1])
    else:
      prompt_pixels = jnp.take(pixel_values, jnp.asarray(index), axis=0)

  def forward(m: mllm.VisionLanguageModel):
    # One apply for both passes: adapter dropout draws fresh masks for each, as in one pass.
    dtype = jnp.dtype(m.cfg.dtype)
    cache = decoder_lib.init_cache(m.cfg.text, prompts, length, dtype)
    out = m(prompt_ids, prompt_positions, prompt_mask, prompt_pixels, prompt_grid or None, cache,
            return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
    hidden = jnp.repeat(out.hidden[:, -1:], group, axis=0)
    if t > 1:
      # The prompt cache is the read-only prefix of its G rows (decoder.Cache 'prefix', as the
      # sampler decodes): no G copies of the prompt's keys, and its gradient sums over the group.
      tail_cache = dict(decoder_lib.init_cache(m.cfg.text, rows, t - 1, dtype),
                        prefix={"layers": out.cache["layers"], "mask": out.cache["mask"]})
      tail = m(completion[:, :-1], positions[..., length:length + t - 1],
               attn_mask[:, length:length + t - 1], cache=tail_cache,
               return_hidden=True, return_logits=False, adapters_enabled=adapters_enabled)
      hidden = jnp.concatenate([hidden, tail.hidden], axis=1)
    return m.decoder.logits(hidden)

  out = model.apply(params, method=forward, rngs=rngs,
                    mutable=[adapters_lib.LOSSES] if with_aux else False)
  logits, state = out if with_aux else (out, {})
  logits = logits / temperature
  scores = (losses.token_log_probs(logits, completion), losses.entropy(logits))
  return scores + (adapters_lib.balance_loss(state),) if with_aux else scores


# ---------------------------------------------------------------------------------------------
# Where state and batches live on a mesh.
# ---------------------------------------------------------------------------------------------


def optimizer_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                              param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `optimizer.init(params)`, from shapes only.

  A state leaf whose tree path ends with a parameter's path and has that parameter's shape
  (Adam's mu and nu, any per-parameter statistic) is placed like the parameter; everything else
  (step counts, schedule state) is replicated. Works for any optax chain, masked or not.
  `abstract_params` is the unboxed tree of shapes (jax.ShapeDtypeStruct or arrays).
  """
  by_path = {}
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(param_shardings)):
    by_path[tuple(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(path, leaf):
    path, shape = tuple(path), tuple(getattr(leaf, "shape", ()))
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  return jax.tree_util.tree_map_with_path(place, abstract_state)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names)


def batch_parallelism(mesh: Mesh) -> int:
  """How many ways the rows of a batch are split: the product of the data-like mesh axes."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def rows_sharding(mesh: Mesh, ndim: int, row_axis: int = 0) -> NamedSharding:
  """Rows (axis `row_axis`) over the data-like mesh axes, all other axes replicated."""
  spec = [None] * ndim
  spec[row_axis] = batch_axes(mesh)
  return NamedSharding(mesh, PartitionSpec(*spec))


def pixel_sharding(mesh: Mesh, num_patches: int) -> NamedSharding:
  """Patches of all rows' images, in row order: split like the rows when the split falls on
  image boundaries of equal-sized images (the pipeline's fixed `resize_to`); else replicated."""
  if num_patches % batch_parallelism(mesh):
    return NamedSharding(mesh, PartitionSpec())
  return rows_sharding(mesh, 2)


def sequence_shardings(mesh: Mesh, num_patches: int) -> SequenceBatch:
  """The sharding of each array of a SequenceBatch (positions are [3, R, L]: rows on axis 1)."""
  rows = lambda ndim, axis=0: rows_sharding(mesh, ndim, axis)
  return SequenceBatch(rows(2), rows(2), rows(3, 1), pixel_sharding(mesh, num_patches), rows(2),
                       rows(2), ())


def _on(x: Any, sharding: NamedSharding) -> Any:
  """`x` placed as `sharding`: a jax.Array is resharded if it lives elsewhere; host data is this
  process's part (all of it in a single-process run)."""
  if x is None:
    return None
  if isinstance(x, jax.Array):
    if x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


# ---------------------------------------------------------------------------------------------
# The step functions.
# ---------------------------------------------------------------------------------------------


class PolicySteps:
  """Jitted scoring, gradient and update functions for one model and optimizer.

  Without `mesh`: plain `jax.jit` on the default device (laptops, tests). With `mesh`: explicit
  in/out shardings. `param_shardings` defaults to what `rules` give the model's logical axes
  (pass the ones the params were created with if they differ); `opt_state_shardings` defaults to
  `optimizer_state_shardings(...)`, which `init_optimizer` uses to create the state.
  `constrain_activations=False` traces the model outside the mesh context: params and batches keep
  their shardings and XLA's propagation alone places the activations (a debugging aid).
  `share_prompt=False` scores every row on its own even when its batch says rows share prompts.
  """

  def __init__(self, model_cfg: ModelConfig, loss_cfg: losses.LossConfig,
               optimizer: optax.GradientTransformation, temperature: float = 1.0,
               trainable: Optional[Callable[[Any], Any]] = None, *,
               mesh: Optional[Mesh] = None, rules: Optional[Sequence[Any]] = None,
               param_shardings: Any = None, opt_state_shardings: Any = None,
               constrain_activations: bool = True, share_prompt: bool = True):
    del trainable  # Adapters decide: with model_cfg.adapter only the 'adapter' collection trains.
    self.model_cfg = model_cfg
    self.model = mllm.VisionLanguageModel(model_cfg)
    self.loss_cfg = loss_cfg
    self.loss_fn = losses.get(loss_cfg.name)
    self.optimizer = optimizer
    self.temperature = temperature
    self.share_prompt = share_prompt
    self.mesh = mesh
    self.rules = sharding_lib.normalize_rules(
        sharding_lib.DEFAULT_RULES if rules is None else rules)
    self.param_shardings = self.opt_state_shardings = None
    self.constrain_activations = False
    self.trainable_shardings = None  # param_shardings of what the optimizer updates
    if mesh is None:
      self._score = jax.jit(self._score_by_grid, static_argnums=(0, 1, 2))
      self._grads = jax.jit(self._grads_by_grid, static_argnums=(0, 1))
      self._update = jax.jit(self._update_impl, donate_argnums=(0, 1))
      self._init_opt = jax.jit(optimizer.init)
      return

    boxed = mllm.abstract_params(model_cfg)
    if param_shardings is None:
      param_shardings = sharding_lib.logical_to_sharding(boxed, mesh, self.rules)
    trainable_shardings = adapters_lib.split(param_shardings)[0]
    if opt_state_shardings is None:
      opt_state_shardings = optimizer_state_shardings(
          optimizer, adapters_lib.split(nn.meta.unbox(boxed))[0], trainable_shardings, mesh)
    self.param_shardings, self.opt_state_shardings = param_shardings, opt_state_shardings
    self.trainable_shardings = trainable_shardings
    self.constrain_activations = constrain_activations
    rep = NamedSharding(mesh, PartitionSpec())
    rows = lambda ndim, axis=0: rows_sharding(mesh, ndim, axis)
    # pixel_values: None takes the argument's placement, chosen per shape by `shard_batch`.
    batch_in = (rows(2), rows(2), rows(3, 1), None, rows(2), rows(2))
    # The image grid and the group size are static and come first (jit takes no keyword
    # arguments with shardings). Shared prompts are sliced from the rows inside the jit, so
    # their rows split over the data axes like the completions' (`prompt_group` checks that).
    self._score = jax.jit(self._score_by_grid, static_argnums=(0, 1, 2),
                          in_shardings=(param_shardings,) + batch_in,
                          out_shardings=(rows(2), rows(2)))
    self._grads = jax.jit(
        self._grads_by_grid, static_argnums=(0, 1),
        in_shardings=(param_shardings,) + batch_in + (rows(1), rows(2), rows(2), rep, rep),
        out_shardings=(trainable_shardings, rep, rep))
    self._update = jax.jit(
        self._update_impl, donate_argnums=(0, 1),
        in_shardings=(trainable_shardings, opt_state_shardings, trainable_shardings),
        out_shardings=(trainable_shardings, opt_state_shardings, rep))
    self._init_opt = jax.jit(optimizer.init, in_shardings=(trainable_shardings,),
                             out_shardings=opt_state_shardings)

  # -- placement ----------------------------------------------------------------------------

  def _context(self):
    """Traces model code under the mesh and rules, so logical constraints become shardings."""
    if self.mesh is None or not self.constrain_activations:
      return contextlib.nullcontext()
    return sharding_lib.mesh_context(self.mesh, self.rules)

  def _place_state(self, tree: Any, shardings: Any) -> Any:
    if self.mesh is None:
      return tree
    return jax.tree.map(_on, tree, shardings)

  def shard_batch(self, seq: SequenceBatch) -> SequenceBatch:
    """This process's rows of a SequenceBatch -> global arrays split as the step functions take
    them (single process: the whole batch, placed on the mesh). Returns `seq` unchanged when
    there is no mesh or it is already placed.

    Every process must feed the same number of rows with images of the same grids (the
    pipeline's fixed `resize_to`): the jitted code is specialised on the global grid, which is the
    local one repeated once per process-slice of the rows.
    """
    if self.mesh is None:
      return seq
    if isinstance(seq.input_ids, jax.Array) and not seq.input_ids.is_fully_addressable:
      return seq  # Already global.
    grid, local_rows = tuple(seq.grid), seq.input_ids.shape[0]
    if jax.process_count() > 1:
      digest = np.asarray([zlib.crc32(repr(grid).encode()) & 0x7FFFFFFF, len(grid)], np.int32)
      multihost_utils.assert_equal(
          digest, "Processes hold images of different grids; every process must feed rows with "
          "the same image sizes (set config.data.pipeline.resize_to).")
    shardings = sequence_shardings(self.mesh, 0)
    out = {}
    try:
      for name in ("input_ids", "attn_mask", "positions", "completion", "completion_mask"):
        out[name] = _on(getattr(seq, name), getattr(shardings, name))
    except ValueError as e:
      parts = batch_parallelism(self.mesh)
      raise ValueError(
          f"{local_rows} rows (on this process) do not split over the mesh's data-like axes "
          f"{batch_axes(self.mesh)} ({parts} devices in all). Make the rows of a micro-batch "
          f"(prompts_per_batch * group_size / micro_batches) a multiple of {parts}, or change "
          f"config.mesh.shape. ({e})") from e
    factor = out["input_ids"].shape[0] // max(local_rows, 1)
    pixels = None
    if grid:
      local = np.asarray(seq.pixel_values) if not isinstance(seq.pixel_values, jax.Array) \
          else seq.pixel_values
      patches = local.shape[0] * factor
      target = pixel_sharding(self.mesh, patches)
      if factor > 1 and not isinstance(local, jax.Array) and not target.spec:
        local = multihost_utils.process_allgather(local, tiled=True)  # replicated: all patches
      pixels = _on(local, target)
    return SequenceBatch(out["input_ids"], out["attn_mask"], out["positions"], pixels,
                         out["completion"], out["completion_mask"], grid * factor, seq.group)

  def prompt_group(self, seq: SequenceBatch) -> int:
    """G when `seq`'s rows are scored with shared prompts, else 1 (row by row). Sharing needs
    whole groups, the same number of images in every row and, on a mesh, a number of prompts
    that the data-like axes divide (the prompt pass is split over them like the rows)."""
    return self.shared_group(seq.input_ids.shape[0], int(getattr(seq, "group", 1)),
                             len(seq.grid))

  def shared_group(self, rows: int, group: int, images: int = 0) -> int:
    """`prompt_group` from shapes: `rows` rows in groups of `group`, holding `images` images."""
    if not self.share_prompt or group <= 1 or rows % group:
      return 1
    if images % rows:
      return 1
    if self.mesh is not None and (rows // group) % batch_parallelism(self.mesh):
      return 1
    return group

  def _rows(self, x: Any, ndim: int) -> Any:
    if self.mesh is None or x is None:
      return x
    return _on(x, rows_sharding(self.mesh, ndim))

  # -- optimizer state ----------------------------------------------------------------------

  def init_optimizer(self, params):
    """`optimizer.init(params)`, created directly with `opt_state_shardings` on a mesh. With
    adapters, `params` is the trainable part (`adapters.split(variables)[0]`)."""
    with self._context():
      return self._init_opt(self._place_state(params, self.trainable_shardings))

  # -- scoring (old / reference log-probs) --------------------------------------------------

  def _score_impl(self, params, input_ids, attn_mask, positions, pixel_values, completion,
                  completion_mask, *, grid, adapters_enabled=True, group=1):
    del completion_mask
    return completion_scores(self.model, params, input_ids, attn_mask, positions,
                             pixel_values, completion, grid, self.temperature,
                             adapters_enabled=adapters_enabled, group=group)

  def _score_by_grid(self, grid, adapters_enabled, group, *args):
    return self._score_impl(*args, grid=grid, adapters_enabled=adapters_enabled, group=group)

  def score(self, params, seq: SequenceBatch, adapters_enabled: bool = True):
    """(logp, entropy) float32 [R, T] of the batch's completions under `params`;
    `adapters_enabled=False` scores the base model alone (the KL reference of adapter runs)."""
    seq = self.shard_batch(seq)
    with self._context():
      return self._score(seq.grid, bool(adapters_enabled), self.prompt_group(seq),
                         self._place_state(params, self.param_shardings), *_array_fields(seq))

  # -- gradients ----------------------------------------------------------------------------

  def _grads_impl(self, params, input_ids, attn_mask, positions, pixel_values, completion,
                  completion_mask, advantages, old_logp, ref_logp, rng=None,
                  token_normalizer=None, *, grid, group=1):
    # With adapters only the 'adapter' collection is differentiated: no base gradient exists.
    trainable, frozen = adapters_lib.split(params)
    adapter = self.model_cfg.adapter

    def objective(p):
      logp, entropy, *aux = completion_scores(
          self.model, adapters_lib.join(p, frozen), input_ids, attn_mask,
          positions, pixel_values, completion, grid, self.temperature,
          rngs=None if rng is None else {"dropout": rng}, with_aux=adapter is not None,
          group=group)
      old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
      loss, metrics = self.loss_fn(logp, old, ref_logp, advantages, completion_mask,
                                   self.loss_cfg, token_normalizer)
      tokens = jnp.maximum(completion_mask.sum(), 1.0)
      metrics = dict(metrics, entropy=(jax.lax.stop_gradient(entropy) * completion_mask).sum()
                     / tokens)
      if aux:
        loss = loss + adapter.balance_coef * aux[0]
        metrics = dict(metrics, balance_loss=jax.lax.stop_gradient(aux[0]))
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    return grads, loss, metrics

  def _grads_by_grid(self, grid, group, *args):
    return self._grads_impl(*args, grid=grid, group=group)

  def grads(self, params, seq: SequenceBatch, advantages, old_logp=None, ref_logp=None,
            rng=None, token_normalizer=None):
    """(grads, loss, metrics) of the loss on `seq`. On a mesh, host (numpy) inputs are this
    process's rows, as for `shard_batch`. With adapters, `params` holds base and adapter
    variables and the grads cover the adapter only; `rng` drives adapter dropout.
    `token_normalizer` is what a token-level loss (dapo) divides by: pass
    `micro_batch_token_normalizer` of the step's micro-batches (None: this batch's own count)."""
    seq = self.shard_batch(seq)
    with self._context():
      return self._grads(seq.grid, self.prompt_group(seq),
                         self._place_state(params, self.param_shardings), *_array_fields(seq),
                         self._rows(advantages, 1), self._rows(old_logp, 2),
                         self._rows(ref_logp, 2), rng,
                         None if token_normalizer is None else jnp.float32(token_normalizer))

  # -- update -------------------------------------------------------------------------------

  def _update_impl(self, params, opt_state, grads):
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state),
            {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)})

  def apply_update(self, params, opt_state, grads):
    """One optax step on the trainable params (all of them, or the adapter part)."""
    with self._context():
      return self._update(self._place_state(params, self.trainable_shardings),
                          self._place_state(opt_state, self.opt_state_shardings),
                          self._place_state(grads, self.trainable_shardings))


def micro_batch_token_normalizer(completion_masks: Sequence[Any]) -> float:
  """The token count each micro-batch's dapo sum is divided by: the completion tokens of the
  whole step (every micro-batch, every process) over the number of micro-batches, whose
  gradients `mean_trees` averages, so the step's gradient is its token sum over its token count
  however it is split."""
  local = int(sum(np.asarray(m).astype(bool).sum() for m in completion_masks))
  total = local
  if jax.process_count() > 1:
    total = int(np.asarray(multihost_utils.process_allgather(np.int32(local))).sum())
  return max(total, 1) / len(completion_masks)


def mean_trees(trees):
  """Element-wise mean of a list of equally shaped pytrees (micro-batch gradients)."""
  return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0, grad_clip: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, end_learning_rate: float = 0.0,
                   mask: Any = None) -> optax.GradientTransformation:
  """AdamW with a linear schedule to `end_learning_rate` (Jigsaw-R1: lr 1e-6 -> 0, no warmup,
  weight decay 0, global-norm clip 1.0, HF Trainer's betas and eps)."""
  decay = optax.linear_schedule(learning_rate, end_learning_rate,
                                max(total_steps - warmup_steps, 1))
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                    decay], [warmup_steps]) if warmup_steps else decay)
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  tx = optax.chain(*chain)
  return optax.masked(tx, mask) if mask is not None else tx
