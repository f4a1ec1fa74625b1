"""Device meshes, logical-axis rules, and where params, optimizer state and batches live.

Every parameter and activation in `jigsaw_jax.models` carries *logical* axis names ("embed", "mlp",
"activation_batch", ...). This module turns those names into placements on a device mesh with three
axes:

- `data`: plain data parallelism (params replicated along it);
- `fsdp`: data parallelism that also shards params and optimizer state (ZeRO-3 style), which is
  what lets a 3B-7B policy plus its Adam moments fit on 16 GiB devices;
- `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

The mapping from logical names to mesh axes is data (`config.mesh.rules`), so trying another
layout is a config change. Params are created already sharded (`jit(init, out_shardings=...)`),
never materialised whole on one device.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
# The leading (batch) axis of every input batch is split over these mesh axes.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical name -> mesh axes. Params: FSDP shards the model dimension, tensor parallelism the
# per-head / MLP / vocabulary dimensions. Activations: the batch goes over every data-like axis;
# the model dimension of the residual stream stays replicated across `tensor` (Megatron layout:
# one all-reduce after attention and after the MLP).
DEFAULT_RULES: Rules = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
)


# ---------------------------------------------------------------------------------------------
# Meshes.
# ---------------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
  """Fills the single -1 in `shape` so that the product equals `num_devices`.

  Raises a ValueError saying what was asked, what exists and how to fix it: the usual mistake is
  a mesh written for a pod run on a smaller machine.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"Mesh shape {shape} has {len(shape)} entries but the mesh has axes "
                     f"{tuple(axis_names)}: give one size per axis.")
  wildcards = [i for i, s in enumerate(shape) if s == -1]
  if len(wildcards) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"Mesh shape {shape}: sizes must be positive, with at most one -1 "
                     "(the axis that takes the remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if wildcards:
    if num_devices % known:
      raise ValueError(f"Mesh shape {shape} over axes {tuple(axis_names)}: the fixed sizes "
                       f"multiply to {known}, which does not divide the {num_devices} devices. "
                       "Pick sizes whose product divides the device count.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"Mesh shape {shape} over axes {tuple(axis_names)} needs "
                     f"{math.prod(shape)} devices but {num_devices} are available. Make the "
                     "sizes multiply to the device count, or put -1 on one axis to fill it.")
  return shape


def device_array(shape: Sequence[int], devices: Sequence[Any],
                 dcn_shape: Optional[Sequence[int]] = None,
                 axis_names: Sequence[str] = MESH_AXES) -> np.ndarray:
  """Arranges `devices` into an array of the mesh's shape.

  Without `dcn_shape`, one slice/host group: `mesh_utils.create_device_mesh` picks a physical
  order that keeps neighbours on the fast interconnect (ICI). With `dcn_shape` (multi-slice TPU,
  multi-node GPU), `shape` is the per-slice (ICI) mesh and `dcn_shape` how slices are laid out
  along each axis over the slow network; the mesh axis sizes are their products. Put the DCN
  parallelism on `data` (e.g. dcn_shape=(num_slices, 1, 1)) so only gradients cross it.
  """
  devices = list(devices)
  if dcn_shape is None:
    shape = resolve_mesh_shape(shape, len(devices), axis_names)
    return mesh_utils.create_device_mesh(shape, devices=devices)
  dcn_shape = tuple(int(s) for s in dcn_shape)
  num_slices = math.prod(dcn_shape)
  if len(dcn_shape) != len(axis_names) or num_slices <= 0 or len(devices) % num_slices:
    raise ValueError(f"DCN mesh shape {dcn_shape} must give one positive size per axis "
                     f"{tuple(axis_names)} and its product ({num_slices}) must divide the "
                     f"{len(devices)} devices.")
  ici_shape = resolve_mesh_shape(shape, len(devices) // num_slices, axis_names)
  # GPUs and CPUs have no slice_index: there the process (host) is the granule.
  process_is_granule = not hasattr(devices[0], "slice_index")
  return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                              process_is_granule=process_is_granule)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), *,
              dcn_shape: Optional[Sequence[int]] = None,
              axis_names: Sequence[str] = MESH_AXES,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with Auto axis types, so flax's logical constraints act as sharding constraints.

  (`jax.make_mesh` defaults to Explicit axes in this JAX, under which sharding is part of the
  types and `with_sharding_constraint` on logical names does not compose the same way.)
  """
  devices = jax.devices() if devices is None else devices
  array = device_array(shape, devices, dcn_shape, axis_names)
  return Mesh(array, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def mesh_from_config(mesh_config: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """`config.mesh` -> Mesh. Fields: `shape`, optional `dcn_shape`, optional `axes`."""
  dcn = getattr(mesh_config, "dcn_shape", None)
  axes = tuple(getattr(mesh_config, "axes", None) or MESH_AXES)
  return make_mesh(tuple(mesh_config.shape), dcn_shape=tuple(dcn) if dcn else None,
                   axis_names=axes, devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
  """Makes `mesh` the current mesh and `rules` the logical-axis rules, for tracing model code.

  Inside, `nn.with_logical_constraint` becomes a real sharding constraint; outside any mesh it is
  a no-op, which is what the single-device tests rely on.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
    yield


# ---------------------------------------------------------------------------------------------
# Logical-axis rules.
# ---------------------------------------------------------------------------------------------


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """Rules as hashable tuples: configs may hold lists (from JSON or the command line)."""
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"Bad logical-axis rule {rule!r}: expected (logical_name, mesh_axes) "
                       "with mesh_axes a mesh axis name, a tuple of them, or None.")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def _mesh_axis_names(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def validate_rules(rules: Rules, mesh: Mesh, logical_names: Sequence[str] = ()) -> None:
  """Refuses rules naming mesh axes the mesh lacks, and logical names no rule maps.

  Flax silently replicates a dimension whose logical name has no rule; a typo there would cost
  memory on a pod without any error, so we make it one.
  """
  for name, axes in rules:
    unknown = [a for a in _mesh_axis_names(axes) if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"Logical-axis rule ({name!r}, {axes!r}) names mesh axes {unknown} "
                       f"that the mesh does not have; mesh axes: {mesh.axis_names}.")
  known = {name for name, _ in rules}
  missing = sorted({n for n in logical_names if n is not None and n not in known})
  if missing:
    raise ValueError(f"Logical axis names {missing} have no sharding rule. Add them to "
                     f"config.mesh.rules (use None to replicate). Known names: {sorted(known)}.")


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]], *,
                        replicate_indivisible: bool = True) -> Any:
  """Tree of `NamedSharding` for a tree whose leaves carry logical axis names.

  `abstract_tree` is what `jax.eval_shape(model.init, ...)` returns: leaves boxed in
  `nn.LogicallyPartitioned`; unboxed leaves (a step counter, Adam's count) are replicated. The
  result has the structure of the *unboxed* tree, ready for `jit(out_shardings=...)`.

  With `replicate_indivisible`, a dimension whose size its mesh axes do not divide (Qwen2.5-3B has
  2 KV heads; a tensor axis of 4 cannot split them) is replicated along those axes and logged,
  instead of failing the whole compile. Set it False to get the error instead.
  """
  rules = normalize_rules(rules)
  boxed = jax.tree.leaves(abstract_tree, is_leaf=_is_boxed)
  names = [n for leaf in boxed if _is_boxed(leaf) for n in leaf.names]
  validate_rules(rules, mesh, names)
  logical_specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  shapes = jax.tree.map(lambda x: x.unbox() if _is_boxed(x) else x, abstract_tree,
                        is_leaf=_is_boxed)

  def fit(path, sharding: NamedSharding, leaf: Any) -> NamedSharding:
    shape = getattr(leaf, "shape", ())
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      parts = math.prod(mesh.shape[a] for a in _mesh_axis_names(axes))
      if size % parts:
        where = jax.tree_util.keystr(path)
        if not replicate_indivisible:
          raise ValueError(f"{where}: dimension {dim} of shape {tuple(shape)} has size {size}, "
                           f"not divisible by mesh axes {axes} ({parts} devices).")
        logging.warning("%s: dimension %d (size %d) is not divisible by mesh axes %s (%d); "
                        "replicating it.", where, dim, size, axes, parts)
        spec[dim] = None
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(fit, shardings, shapes)


# ---------------------------------------------------------------------------------------------
# Where train state and batches live.
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
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


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


def place(x: Any, sharding: NamedSharding) -> Any:
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
# Multi-process runtime.
# ---------------------------------------------------------------------------------------------


def maybe_initialize_distributed(config: Any) -> bool:
  """Starts JAX's multi-controller runtime when the config asks for it; True if it did.

  `config` (e.g. `config.distributed`) has `coordinator_address` ('host:port'), `num_processes`,
  `process_id`, and `auto_detect` (TPU pods and SLURM: JAX reads the cluster environment itself).
  With none of these set this is a single-process run and nothing is touched, so laptops and
  tests never wait on a coordinator. Must run before anything else touches the devices.
  """
  get = (config.get if isinstance(config, Mapping) else
         lambda key, default=None: getattr(config, key, default))
  address = get("coordinator_address", None) or None
  auto = bool(get("auto_detect", False))
  if not address and not auto:
    return False
  if jax.distributed.is_initialized():
    logging.info("jax.distributed already initialised; leaving it as it is.")
    return False
  if auto:
    jax.distributed.initialize()
  else:
    num_processes, process_id = get("num_processes", None), get("process_id", None)
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator_address={address!r} is set but num_processes="
                       f"{num_processes!r} / process_id={process_id!r} are not: set both, or "
                       "use auto_detect=True on TPU pods and SLURM.")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                               process_id=int(process_id))
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
