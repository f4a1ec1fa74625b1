"""Orbax checkpoints of a training run: train state, data position and run metadata.

A checkpoint is one Orbax step directory with three items:

- `state`: the train-state pytree (params, optimizer state, step, PRNG key data), saved with
  `StandardSave` so every array is written by the hosts that own its shards, and restored with
  `StandardRestore` into the target's shardings (a different mesh re-shards on load);
- `data`: the grain iterator state (JSON), so a resumed run sees exactly the batches the
  uninterrupted run would have seen. Resume that forgets the data position silently changes the
  experiment;
- `metadata`: small JSON about the run (config, versions, wall time) for humans and tools.

Saving is asynchronous: `save` returns once the arrays are copied off the device, and the write
continues in the background, so the next training step may donate the state's buffers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

STATE, DATA, METADATA = "state", "data", "metadata"


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not have the target's keys or shapes."""


class NonFiniteStateError(FloatingPointError):
  """A state with NaN/Inf was about to be saved."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` found: the step and the three items."""
  step: int
  state: Any
  data_state: Optional[dict]
  metadata: dict


# ---------------------------------------------------------------------------------------------
# NaN/Inf guard.
# ---------------------------------------------------------------------------------------------


def _float_leaves(tree: Any) -> list[Any]:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


@jax.jit
def _all_finite(leaves: Sequence[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN and Inf.

  One fused reduction and one scalar to the host, cheap enough to run before every save (and
  after every update, if the trainer wants to skip bad steps).
  """
  leaves = _float_leaves(tree)
  return True if not leaves else bool(_all_finite(leaves))


def nonfinite_paths(tree: Any) -> list[str]:
  """Key paths of the floating-point leaves that hold NaN or Inf: for the error message."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
      if not bool(jnp.all(jnp.isfinite(x))):
        bad.append(jax.tree_util.keystr(path))
  return bad


# ---------------------------------------------------------------------------------------------
# PRNG keys: Orbax stores arrays, so typed keys travel as their uint32 key data.
# ---------------------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  # An abstract key (ShapeDtypeStruct) has no public accessor for its impl; its dtype holds it.
  return getattr(x.dtype, "_impl", None)


def _keys_to_data(tree: Any) -> Any:
  """Replaces typed PRNG keys (concrete or abstract) by their key data."""

  def convert(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.Array):
      return jax.random.key_data(x)
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)

  return jax.tree.map(convert, tree)


def _data_to_keys(restored: Any, target: Any) -> Any:
  """Rewraps key data wherever the target holds a typed key."""
  return jax.tree.map(
      lambda r, t: jax.random.wrap_key_data(r, impl=_key_impl(t)) if _is_key(t) else r,
      restored, target)


def _abstract(target: Any) -> Any:
  """ShapeDtypeStructs with the target's shardings: where each restored array must land."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(target))


# ---------------------------------------------------------------------------------------------
# Tree matching.
# ---------------------------------------------------------------------------------------------


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in ocp.tree.to_flat_dict(tree).items()}


def check_tree_matches(saved: Any, target: Any, where: str = "checkpoint") -> None:
  """Raises CheckpointMismatchError naming every key that differs between the two trees.

  Orbax would otherwise fail part-way through reading (or, for shapes, in a message that does
  not say which parameter): a changed model or optimizer config is the usual cause.
  """
  saved, target = _flat(saved), _flat(target)
  problems = []
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  if missing:
    problems.append(f"in the target but not the checkpoint: {', '.join(missing)}")
  if extra:
    problems.append(f"in the checkpoint but not the target: {', '.join(extra)}")
  for key in sorted(set(saved) & set(target)):
    want, got = getattr(target[key], "shape", None), getattr(saved[key], "shape", None)
    if want is not None and got is not None and tuple(want) != tuple(got):
      problems.append(f"{key}: checkpoint shape {tuple(got)}, target shape {tuple(want)}")
  if problems:
    raise CheckpointMismatchError(
        f"The {where} does not match the state it is restored into; "
        + "; ".join(problems) + ". Restore with the config that wrote it, or point "
        "--workdir at a fresh directory to start over.")


# ---------------------------------------------------------------------------------------------
# The checkpointer.
# ---------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
  """Grain iterators give dicts (MapDataset) or JSON bytes (DataLoader); store both as JSON."""
  if isinstance(value, (bytes, str)):
    return json.loads(value)
  return value


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` with the run's three items.

  Usage in a train loop:

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3,
                        save_interval_steps=100)
    restored = ckpt.restore(state)          # None on a fresh workdir
    if restored:
      state, data_iter_state = restored.state, restored.data_state
    ...
    ckpt.save(step, state, data_state=it.get_state(), metadata={...})
    ...
    ckpt.close()                            # waits for the last async save
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = True,
               refuse_nonfinite: bool = True):
    self.directory = os.fspath(directory)
    self.refuse_nonfinite = refuse_nonfinite
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True,
        # A run killed mid-save leaves a temporary directory; the restart removes it.
        cleanup_tmp_directories=True)
    # Handlers named up front so that item metadata (the saved tree) can be read before restore.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: ocp.JsonCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, workdir: str | os.PathLike, config: Any) -> "Checkpointer":
    """From `config.checkpoint`: `subdir`, `max_to_keep`, `save_every_steps`, `async_save`."""
    return cls(os.path.join(os.fspath(workdir), config.get("subdir", "checkpoints")),
               max_to_keep=config.get("max_to_keep", 3),
               save_interval_steps=config.get("save_every_steps", 1),
               async_save=config.get("async_save", True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would write: every `save_interval_steps`, and the first."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True once the cluster signalled preemption (agreed across hosts): save with force=True
    and exit, so a preempted TPU/SLURM job resumes from this step rather than the last interval."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, *, data_state: Optional[Mapping[str, Any]] = None,
           metadata: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Starts an asynchronous save of step `step`; False when the interval says to skip it.

    Refuses (NonFiniteStateError) a state with NaN/Inf, naming the leaves, so a diverged run
    never overwrites its last good checkpoints. `force=True` saves off the interval (the last
    step, a preemption). In a multi-process run every process must call this (it is collective).
    """
    if not force and not self._manager.should_save(step):
      return False
    state = _keys_to_data(state)
    if self.refuse_nonfinite and not all_finite(state):
      raise NonFiniteStateError(
          f"Refusing to save step {step}: non-finite values in {nonfinite_paths(state)}. "
          "The last good checkpoint is kept; lower the learning rate or check the loss.")
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave(_json_ready(data_state)),
        METADATA: ocp.args.JsonSave(dict(metadata or {})),
    })
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      logging.info("Checkpoint of step %d started in %s.", step, self.directory)
    return saved

  def restore(self, target: Any, step: Optional[int] = None) -> Optional[Restored]:
    """Restores `step` (default: the latest) into arrays shaped and sharded like `target`.

    `target` is the state a fresh run would create, concrete or abstract (`jax.eval_shape`, or
    ShapeDtypeStructs with shardings); nothing of it is read but shapes, dtypes and shardings.
    Returns None when the directory holds no checkpoint and no step was asked for.
    """
    step = self._pick_step(step)
    if step is None:
      return None
    abstract = _abstract(target)
    saved_tree = self.saved_tree(step)
    check_tree_matches(saved_tree, abstract,
                       where=f"checkpoint of step {step} in {self.directory}")
    items = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract),
        DATA: ocp.args.JsonRestore(),
        METADATA: ocp.args.JsonRestore(),
    }))
    logging.info("Restored step %d from %s.", step, self.directory)
    return Restored(step=step, state=_data_to_keys(items[STATE], target),
                    data_state=items[DATA], metadata=items[METADATA] or {})

  def saved_tree(self, step: int) -> Any:
    """The saved state's tree (shapes and dtypes, no values) of `step`."""
    return self._manager.item_metadata(step)[STATE]

  def restore_part(self, key: str, target: Any, step: Optional[int] = None
                   ) -> Optional[tuple[int, Any]]:
    """(step, state[key]) restored alone into `target`'s shapes and shardings; None when the
    directory holds no checkpoint and no step was asked for.

    Reads only that part of the saved state: another run's params without its optimizer state,
    so no optimizer needs building (or fitting in memory) just to shape a restore target.
    """
    step = self._pick_step(step)
    if step is None:
      return None
    saved = self.saved_tree(step)
    if key not in saved:
      raise CheckpointMismatchError(
          f"The checkpoint of step {step} in {self.directory} has no {key!r}; it holds "
          f"{', '.join(sorted(saved))}.")
    abstract = {key: _abstract(target)}
    check_tree_matches({key: saved[key]}, abstract,
                       where=f"checkpoint of step {step} in {self.directory}")
    # StandardCheckpointHandler writes the PyTree format, which PyTreeRestore reads in part.
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), STATE), args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
    logging.info("Restored %s of step %d from %s.", key, step, self.directory)
    return step, _data_to_keys(restored[key], target)

  def _pick_step(self, step: Optional[int]) -> Optional[int]:
    if step is None:
      return self.latest_step()
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; "
                              f"available steps: {self.all_steps()}.")
    return step

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk (call before exiting or evaluating)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
