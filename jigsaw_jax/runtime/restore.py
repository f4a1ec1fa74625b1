"""Restoring parameters: one path for resume, `init_from`, `task=eval` and `task=export`.

Another run's parameters are read into abstract targets (shapes, dtypes and shardings from
`jax.eval_shape`): nothing is allocated before the read, and only the params are read, never the
optimizer state. A run is one of three kinds, told apart by what its checkpoints hold:

- `policy`: the whole policy trained (GRPO, SFT): state["params"] is every model variable;
- `adapter`: adapters on a frozen base: state["params"] is {"adapter": ...}; the base is rebuilt
  the way the run built it (its `init_from`, its pretrained `base/`, the HF checkpoint, or the
  seed's random init);
- `proxy`: Proxy-RLHF: state["proxy"] is the proxy; the policy is the frozen base, rebuilt alike.

How the run built its model is read from its saved config (`runtime/run_config.py`); a run that
saved none is read with the caller's config. A checkpoint that does not fit is refused with the
parameters that differ and the settings to pass.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import ml_collections

from jigsaw_jax.runtime import metrics as metrics_lib
from jigsaw_jax.models import adapters as adapters_lib
from jigsaw_jax.models import mllm
from jigsaw_jax.models import policy as policy_lib
from jigsaw_jax.models.config import ModelConfig
from jigsaw_jax.rl.proxy import network as proxy_lib
from jigsaw_jax.runtime import checkpoint as checkpoint_lib
from jigsaw_jax.runtime import run_config

POLICY, ADAPTER, PROXY = "policy", "adapter", "proxy"


@dataclasses.dataclass(frozen=True)
class RunParams:
  """What a run trained, ready to use: the policy's variables (base and adapter joined) and, for
  a proxy run, the proxy's params."""
  kind: str
  step: int
  model_cfg: ModelConfig  # with the adapter for adapter runs
  variables: Any
  proxy: Optional[Any]
  proxy_cfg: Optional[proxy_lib.ProxyConfig]
  config: ml_collections.ConfigDict  # the run's own config (saved, or the caller's)


def abstract(tree: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """ShapeDtypeStructs of a concrete, abstract or boxed tree, keeping each leaf's sharding
  (or giving all `sharding`)."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))
  return jax.tree.map(one, nn.unbox(tree))


def _replicated() -> jax.sharding.Sharding:
  mesh = jax.sharding.Mesh(jax.devices(), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def resume(ckpt: checkpoint_lib.Checkpointer, state: Any, data_iter=None) -> Any:
  """The run's own latest state (and data position) when its workdir has a checkpoint, else
  `state` as given: what every train loop does before its first step."""
  restored = ckpt.restore(state)
  if restored is None:
    return state
  if data_iter is not None:
    data_iter.set_state(restored.data_state)
  metrics_lib.console(f"Resumed from step {restored.step} of {ckpt.directory}.")
  return restored.state


def run_kind(saved_state: Any) -> str:
  """POLICY, ADAPTER or PROXY from a checkpoint's saved tree."""
  if PROXY in saved_state:
    return PROXY
  if adapters_lib.COLLECTION in saved_state.get("params", {}):
    return ADAPTER
  return POLICY


def _describe(config) -> str:
  model, adapter = config.model, config.get("adapter")
  what = f"model.checkpoint={model.checkpoint!r}" if model.checkpoint else (
      f"model.preset={model.preset!r}")
  if adapter is not None and adapter.kind != "none":
    what += f", adapter.kind={adapter.kind!r} (rank {adapter.rank}, experts {adapter.experts})"
  return what


def _mismatch(error: Exception, run_workdir: str, kind: str, used, saved) -> Exception:
  if saved is None:
    hint = (f"{run_workdir} saved no {run_config.FILENAME}: pass the --config.model.* and "
            "--config.adapter.* settings it was trained with")
  else:
    hint = (f"restored as {_describe(used)}, but the run's {run_config.FILENAME} says "
            f"{_describe(saved)}: drop the overrides that change the model, or pass those")
  return checkpoint_lib.CheckpointMismatchError(
      f"The {kind} run in {run_workdir} does not fit the model it is restored into. {error} "
      f"Hint: {hint}.")


def _read(directory: str, key: str, target: Any, step: Optional[int], *, what: str,
          mismatch) -> tuple[int, Any]:
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=None)
  try:
    found = ckpt.restore_part(key, target, step)
  except checkpoint_lib.CheckpointMismatchError as e:
    raise mismatch(e) from None
  finally:
    ckpt.close()
  if found is None:
    raise FileNotFoundError(f"{what}: no checkpoint in {directory}; point it at the workdir of "
                            "a run that saved one.")
  return found


def _model_variables(model_cfg: ModelConfig, sharding) -> Any:
  return abstract(policy_lib.abstract_params(model_cfg), sharding)


def _base_variables(config, model, run_workdir: str, kind: str, model_cfg: ModelConfig, target,
                    mismatch) -> Any:
  """The frozen base of an adapter or proxy run, built the way that run built it."""
  if config.init_from:
    return policy_variables(config, config.init_from, target)
  base_dir = os.path.join(run_workdir, "base")
  if config.pretrain.steps and os.path.isdir(base_dir):
    return _read(base_dir, "params", target, None, what=f"the pretrained base of {run_workdir}",
                 mismatch=mismatch)[1]
  # The trainers draw the base's init key as the second of split(key(seed)) (3 ways: proxy).
  init_rng = jax.random.split(jax.random.key(config.seed), 3 if kind == PROXY else 2)[1]
  shardings = jax.tree.map(lambda x: x.sharding, target)
  return policy_lib.initial_params(model, model_cfg, init_rng, shardings)


def run_params(run_workdir: str, config: ml_collections.ConfigDict, *,
               step: Optional[int] = None, base_target: Any = None) -> RunParams:
  """The parameters `run_workdir` trained (its latest checkpoint, or `step`).

  The model is `config.model` (the caller's); how the run built its base (init_from, pretrain,
  seed) and its adapter and proxy settings come from the run's saved config, or `config` for a
  run that saved none.
  `base_target` gives the base variables' shardings (default: replicated on every device).
  """
  saved = run_config.load(run_workdir)
  run_cfg = saved if saved is not None else config
  subdir = run_cfg.checkpoint.get("subdir", "checkpoints")
  ckpt_dir = os.path.join(run_workdir, subdir)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=None)
  at = step or ckpt.latest_step()
  if at is None:
    ckpt.close()
    raise FileNotFoundError(f"No checkpoint under {ckpt_dir}: train first, or point the restore "
                            "at a run's workdir.")
  kind = run_kind(ckpt.saved_tree(at))
  ckpt.close()
  # The model as the caller has it (eval and export inherit it from the run's config, with the
  # user's explicit overrides); how the base was built, from the run's own config.
  model_cfg = policy_lib.model_config(config.model)
  if base_target is None:
    base_target = _model_variables(model_cfg, _replicated())
  mismatch = lambda e: _mismatch(e, run_workdir, kind, config, saved)
  what = f"the run {run_workdir}"
  if kind == POLICY:
    at, variables = _read(ckpt_dir, "params", base_target, at, what=what, mismatch=mismatch)
    return RunParams(kind, at, model_cfg, variables, None, None, run_cfg)
  base = _base_variables(run_cfg, config.model, run_workdir, kind, model_cfg, base_target,
                         mismatch)
  if kind == ADAPTER:
    model_cfg = dataclasses.replace(model_cfg, adapter=policy_lib.adapter_config(run_cfg))
    if model_cfg.adapter is None:
      raise mismatch(ValueError("Its checkpoints hold adapters, but its config has "
                                "adapter.kind='none'."))
    target = abstract(jax.eval_shape(lambda r: mllm.init_adapters(model_cfg, r),
                                     jax.random.key(0)),
                      _replicated())
    at, trained = _read(ckpt_dir, "params", target, at, what=what, mismatch=mismatch)
    return RunParams(kind, at, model_cfg, adapters_lib.join(trained, base), None, None, run_cfg)
  proxy_cfg = proxy_lib.config_from(run_cfg.proxy)
  target = abstract(proxy_lib.abstract_proxy_params(model_cfg, proxy_cfg), _replicated())
  at, proxy = _read(ckpt_dir, PROXY, target, at, what=what, mismatch=mismatch)
  return RunParams(kind, at, model_cfg, base, proxy, proxy_cfg, run_cfg)


def merged_variables(found: RunParams) -> Any:
  """The run's policy as plain model variables (LoRA folded into its kernels)."""
  if found.kind == PROXY:
    raise ValueError(
        "A Proxy-RLHF run trains no policy weights (its proxy steers a frozen policy while "
        "decoding), so it has no single set of weights to start from or export. Use the run its "
        "base came from (its init_from), or evaluate it with task=eval.")
  return adapters_lib.merge_adapters(found.variables, found.model_cfg)


def policy_variables(config: ml_collections.ConfigDict, run_workdir: str, like: Any) -> Any:
  """Another run's latest policy (`init_from`), as plain variables shaped and sharded `like`."""
  found = run_params(run_workdir, config, base_target=abstract(like))
  logging.info("Starting from step %d of %s (a %s run).", found.step, run_workdir, found.kind)
  return merged_variables(found)
