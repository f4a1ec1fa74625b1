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

A SequenceBatch holds each prompt once and its G completions (`build_sequences`). Rows that come
in whole groups (`seq.group` = G) are scored with the prompt run once per group and its KV cache
shared by the G completions (rl/scoring.py `shared_prompt_scores`): the same numbers, ~G times
less prompt work. `share_prompt=False`, G = 1, a micro-batch cut through groups, or a mesh whose
data-like axes do not divide the number of prompts use the row-by-row pass, which gathers each
row's prompt inside the jit.
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

from jigsaw_jax.runtime import sharding as sharding_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.rl.grpo import losses
from jigsaw_jax.rl.optim import guarded_update
from jigsaw_jax.rl.scoring import completion_scores
from jigsaw_jax.rl.sequences import SequenceBatch


class PolicySteps:
  """Jitted scoring, gradient and update functions for one model and optimizer.

  Without `mesh`: plain `jax.jit` on the default device (laptops, tests). With `mesh`: explicit
  in/out shardings. `param_shardings` defaults to what `rules` give the model's logical axes
  (pass the ones the params were created with if they differ); `opt_state_shardings` defaults to
  `sharding_lib.optimizer_state_shardings(...)`, which `init_optimizer` uses to create the state.
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
      self._score = jax.jit(self._score_by_layout, static_argnums=(0, 1, 2))
      self._grads = jax.jit(self._grads_by_layout, static_argnums=(0, 1))
      self._update = jax.jit(self._update_impl, donate_argnums=(0, 1))
      self._init_opt = jax.jit(optimizer.init)
      return

    boxed = mllm.abstract_params(model_cfg)
    if param_shardings is None:
      param_shardings = sharding_lib.logical_to_sharding(boxed, mesh, self.rules)
    trainable_shardings = adapters_lib.split(param_shardings)[0]
    if opt_state_shardings is None:
      opt_state_shardings = sharding_lib.optimizer_state_shardings(
          optimizer, adapters_lib.split(nn.meta.unbox(boxed))[0], trainable_shardings, mesh)
    self.param_shardings, self.opt_state_shardings = param_shardings, opt_state_shardings
    self.trainable_shardings = trainable_shardings
    self.constrain_activations = constrain_activations
    rep = NamedSharding(mesh, PartitionSpec())
    rows = lambda ndim, axis=0: sharding_lib.rows_sharding(mesh, ndim, axis)
    # The prompt arrays and pixel_values: None takes the argument's placement, which
    # `shard_batch` chooses per shape (split like the rows where the data axes divide the
    # prompts, else whole on every device); completions split over the data axes.
    batch_in = (None, None, None, None, rows(2), rows(2), rows(3, 1))
    # The layout (image grid, group, prompt index) and the share-prompt switch are static and
    # come first (jit takes no keyword arguments with shardings).
    self._score = jax.jit(self._score_by_layout, static_argnums=(0, 1, 2),
                          in_shardings=(param_shardings,) + batch_in,
                          out_shardings=(rows(2), rows(2)))
    self._grads = jax.jit(
        self._grads_by_layout, static_argnums=(0, 1),
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
    return jax.tree.map(sharding_lib.place, tree, shardings)

  def shard_batch(self, seq: SequenceBatch) -> SequenceBatch:
    """This process's rows of a SequenceBatch (and the prompts they continue) -> global arrays
    placed as the step functions take them (single process: the whole batch, placed on the
    mesh). Returns `seq` unchanged when there is no mesh or it is already placed.

    Every process must feed the same number of rows and prompts with images of the same grids
    (the pipeline's fixed `resize_to`): the jitted code is specialised on the global layout, which
    is the local one repeated once per process-slice of the rows.
    """
    if self.mesh is None:
      return seq
    if isinstance(seq.completion, jax.Array) and not seq.completion.is_fully_addressable:
      return seq  # Already global.
    local_rows, local_prompts = seq.rows, seq.prompts
    if jax.process_count() > 1:
      layout = repr((tuple(seq.grid), local_prompts, seq.prompt_index)).encode()
      digest = np.asarray([zlib.crc32(layout) & 0x7FFFFFFF, len(seq.grid)], np.int32)
      multihost_utils.assert_equal(
          digest, "Processes hold images of different grids; every process must feed rows with "
          "the same image sizes (set config.data.pipeline.resize_to).")
    rows = lambda ndim, axis=0: sharding_lib.rows_sharding(self.mesh, ndim, axis)
    try:
      completion = [sharding_lib.place(x, rows(x.ndim, x.ndim - 2)) for x in
                    (seq.completion, seq.completion_mask, seq.completion_positions)]
    except ValueError as e:
      parts = sharding_lib.batch_parallelism(self.mesh)
      raise ValueError(
          f"{local_rows} rows (on this process) do not split over the mesh's data-like axes "
          f"{sharding_lib.batch_axes(self.mesh)} ({parts} devices in all). Make the rows of a "
          f"micro-batch (prompts_per_batch * group_size / micro_batches) a multiple of {parts}, "
          "or change "
          f"config.mesh.shape. ({e})") from e
    factor = completion[0].shape[0] // max(local_rows, 1)
    split = (local_prompts * factor) % sharding_lib.batch_parallelism(self.mesh) == 0

    def place_prompts(x, target):
      if x is None:
        return None
      axis = x.ndim - 2  # prompts: axis 0, or 1 for positions [3, P, L]
      if factor > 1 and not isinstance(x, jax.Array) and not target.spec:
        # Whole on every device: every process's prompts, in process order.
        x = np.moveaxis(multihost_utils.process_allgather(
            np.moveaxis(np.asarray(x), axis, 0), tiled=True), 0, axis)
      return sharding_lib.place(x, target)

    replicated = NamedSharding(self.mesh, PartitionSpec())
    prompt_arrays = [place_prompts(x, rows(x.ndim, x.ndim - 2) if split else replicated)
                     for x in (seq.prompt_ids, seq.prompt_mask, seq.prompt_positions)]
    pixels = None
    if seq.grid:
      patches = np.shape(seq.pixel_values)[0] * factor
      pixels = place_prompts(seq.pixel_values, sharding_lib.pixel_sharding(self.mesh, patches))
    index = seq.prompt_index
    if index is not None:
      index = tuple(p + k * local_prompts for k in range(factor) for p in index)
    return SequenceBatch(*prompt_arrays, pixels, *completion, tuple(seq.grid) * factor,
                         seq.group, index)

  def prompt_group(self, seq: SequenceBatch) -> int:
    """G when `seq`'s rows are scored with shared prompts, else 1 (row by row). Sharing needs
    whole groups, the same number of images in every row and, on a mesh, a number of prompts
    that the data-like axes divide (the prompt pass is split over them like the rows)."""
    group = int(getattr(seq, "group", 1)) if seq.prompt_index is None else 1
    return self.shared_group(seq.rows, group, len(seq.grid) * group)

  def shared_group(self, rows: int, group: int, images: int = 0) -> int:
    """`prompt_group` from shapes: `rows` rows in groups of `group`, holding `images` images."""
    if not self.share_prompt or group <= 1 or rows % group:
      return 1
    if images % rows:
      return 1
    if self.mesh is not None and (rows // group) % sharding_lib.batch_parallelism(self.mesh):
      return 1
    return group

  def _rows(self, x: Any, ndim: int) -> Any:
    if self.mesh is None or x is None:
      return x
    return sharding_lib.place(x, sharding_lib.rows_sharding(self.mesh, ndim))

  # -- optimizer state ----------------------------------------------------------------------

  def init_optimizer(self, params):
    """`optimizer.init(params)`, created directly with `opt_state_shardings` on a mesh. With
    adapters, `params` is the trainable part (`adapters.split(variables)[0]`)."""
    with self._context():
      return self._init_opt(self._place_state(params, self.trainable_shardings))

  # -- scoring (old / reference log-probs) --------------------------------------------------

  def _score_by_layout(self, layout, adapters_enabled, share, params, *arrays):
    return completion_scores(self.model, params, SequenceBatch.from_parts(arrays, layout),
                             self.temperature, share_prompt=share,
                             adapters_enabled=adapters_enabled)

  def score(self, params, seq: SequenceBatch, adapters_enabled: bool = True):
    """(logp, entropy) float32 [R, T] of the batch's completions under `params`;
    `adapters_enabled=False` scores the base model alone (the KL reference of adapter runs)."""
    seq = self.shard_batch(seq)
    with self._context():
      return self._score(seq.layout(), bool(adapters_enabled), self.prompt_group(seq) > 1,
                         self._place_state(params, self.param_shardings), *seq.arrays())

  # -- gradients ----------------------------------------------------------------------------

  def _grads_by_layout(self, layout, share, params, prompt_ids, prompt_mask, prompt_positions,
                       pixel_values, completion, completion_mask, completion_positions,
                       advantages, old_logp, ref_logp, rng=None, token_normalizer=None):
    seq = SequenceBatch(prompt_ids, prompt_mask, prompt_positions, pixel_values, completion,
                        completion_mask, completion_positions, *layout)
    # With adapters only the 'adapter' collection is differentiated: no base gradient exists.
    trainable, frozen = adapters_lib.split(params)
    adapter = self.model_cfg.adapter

    def objective(p):
      logp, entropy, *aux = completion_scores(
          self.model, adapters_lib.join(p, frozen), seq, self.temperature, share_prompt=share,
          rngs=None if rng is None else {"dropout": rng}, with_aux=adapter is not None)
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

  def grads(self, params, seq: SequenceBatch, advantages, old_logp=None, ref_logp=None,
            rng=None, token_normalizer=None):
    """(grads, loss, metrics) of the loss on `seq`. On a mesh, host (numpy) inputs are this
    process's rows, as for `shard_batch`. With adapters, `params` holds base and adapter
    variables and the grads cover the adapter only; `rng` drives adapter dropout.
    `token_normalizer` is what a token-level loss (dapo) divides by: pass
    `micro_batch_token_normalizer` of the step's micro-batches (None: this batch's own count)."""
    seq = self.shard_batch(seq)
    with self._context():
      return self._grads(seq.layout(), self.prompt_group(seq) > 1,
                         self._place_state(params, self.param_shardings), *seq.arrays(),
                         self._rows(advantages, 1), self._rows(old_logp, 2),
                         self._rows(ref_logp, 2), rng,
                         None if token_normalizer is None else jnp.float32(token_normalizer))

  # -- update -------------------------------------------------------------------------------

  def _update_impl(self, params, opt_state, grads):
    return guarded_update(self.optimizer, params, opt_state, grads)

  def apply_update(self, params, opt_state, grads):
    """One optax step on the trainable params (all of them, or the adapter part)."""
    with self._context():
      return self._update(self._place_state(params, self.trainable_shardings),
                          self._place_state(opt_state, self.opt_state_shardings),
                          self._place_state(grads, self.trainable_shardings))
