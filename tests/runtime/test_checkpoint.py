"""Orbax checkpoints: round trip, keep-N, interval, resume after restart, refusals."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jigsaw_jax.runtime import checkpoint as ckpt_lib


def _state(seed: int = 0, width: int = 3):
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (2, width)),
                      "bias": jnp.arange(width, dtype=jnp.float32)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(seed),
          "rng": jax.random.key(seed + 100)}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.dtype == y.dtype


def test_round_trip_restores_state_data_position_and_metadata(tmp_path):
  state = _state(seed=7)
  data_state = {"next_index": 12, "epoch": 0, "seed": 3}
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.save(7, state, data_state=data_state, metadata={"config": {"lr": 1e-6}})
    ckpt.wait_until_finished()
    target = jax.eval_shape(lambda: _state(seed=0))  # abstract: nothing allocated
    restored = ckpt.restore(target)
  assert restored.step == 7
  _assert_same(restored.state, state)
  assert restored.data_state == data_state
  assert restored.metadata == {"config": {"lr": 1e-6}}
  # The restored key is a usable typed key and continues the same stream.
  np.testing.assert_array_equal(jax.random.normal(restored.state["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))
  # Optimizer-state containers come back as the target's types (optax namedtuples).
  assert type(restored.state["opt_state"][1][0]) is type(state["opt_state"][1][0])


def test_grain_json_bytes_state_is_stored_as_json(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(), data_state=b'{"last_seen_indices": {"0": 5}}')
    ckpt.wait_until_finished()
    assert ckpt.restore(_state()).data_state == {"last_seen_indices": {"0": 5}}


def test_keeps_the_last_n_and_saves_on_the_interval(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=5) as ckpt:
    saved = [s for s in range(1, 21) if ckpt.save(s, _state(seed=s))]
    ckpt.wait_until_finished()
    # The first step always saves (nothing to resume from yet), then every 5 steps.
    assert saved == [1, 5, 10, 15, 20]
    assert ckpt.all_steps() == [15, 20]
    assert ckpt.save(21, _state(), force=True)


def test_restart_resumes_from_latest_and_can_pick_a_step(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _state(seed=step), data_state={"next_index": step * 4})
  ckpt.close()
  # A new process: a new manager on the same directory.
  again = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
  restored = again.restore(_state())
  assert (restored.step, restored.data_state) == (3, {"next_index": 12})
  _assert_same(restored.state, _state(seed=3))
  assert again.restore(_state(), step=2).data_state == {"next_index": 8}
  with pytest.raises(FileNotFoundError, match=r"available steps: \[1, 2, 3\]"):
    again.restore(_state(), step=9)
  again.close()


def test_from_config(tmp_path):
  config = ml_collections.ConfigDict({"subdir": "ckpts", "max_to_keep": 1,
                                      "save_every_steps": 2, "async_save": False})
  with ckpt_lib.Checkpointer.from_config(tmp_path, config) as ckpt:
    assert [s for s in range(1, 6) if ckpt.save(s, _state())] == [1, 2, 4]
    assert ckpt.all_steps() == [4]
  assert (tmp_path / "ckpts" / "4").is_dir()


def test_fresh_directory_restores_nothing(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path / "new") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore(_state()) is None


def test_mismatched_tree_is_refused_naming_the_key(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state())
    ckpt.wait_until_finished()
    renamed = _state()
    renamed["params"]["dense"]["scale"] = renamed["params"]["dense"].pop("bias")
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"not the checkpoint: params/dense/scale.*"
                             r"not the target: .*params/dense/bias"):
      ckpt.restore(renamed)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"params/dense/kernel: checkpoint shape \(2, 3\), "
                             r"target shape \(2, 4\)"):
      ckpt.restore(_state(width=4))


def test_async_save_finishes_even_if_the_state_is_donated_right_after(tmp_path):
  state = _state(seed=5)
  expected = jax.tree.map(np.asarray, jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
      state))
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=True)
  assert ckpt.save(5, state)
  # The next train step donates the buffers; the background write must not need them.
  for leaf in jax.tree.leaves(state):
    leaf.delete()
  ckpt.wait_until_finished()
  assert (tmp_path / "5" / "state").is_dir()
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
  restored = ckpt.restore(_state())
  for x, y in zip(jax.tree.leaves(restored.state["params"]), jax.tree.leaves(expected["params"])):
    np.testing.assert_array_equal(x, y)
  ckpt.close()


def test_nonfinite_state_never_reaches_a_checkpoint(tmp_path):
  good, bad = _state(), _state()
  bad["params"]["dense"]["bias"] = bad["params"]["dense"]["bias"].at[1].set(jnp.nan)
  assert ckpt_lib.all_finite(good) and not ckpt_lib.all_finite(bad)
  assert not ckpt_lib.all_finite({"x": jnp.array([1.0, jnp.inf])})
  assert ckpt_lib.all_finite({"ids": jnp.arange(3), "none": None})
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"\['params'\]\['dense'\]\['bias'\]"):
      ckpt.save(1, bad)
    assert ckpt.all_steps() == []


_RESHARD_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jigsaw_jax.runtime import sharding as shd
    from jigsaw_jax.runtime import checkpoint as ckpt_lib

    directory = sys.argv[1]
    saved_on = shd.make_mesh((4, 1, 1))
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(saved_on, P("data")))
    state = {"w": w, "rng": jax.random.key(3)}
    with ckpt_lib.Checkpointer(directory) as ckpt:
      ckpt.save(1, state)
    # Restore on a different layout: the target's shardings decide where shards land.
    mesh = shd.make_mesh((1, 2, 2))
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                        sharding=NamedSharding(mesh, P("fsdp", "tensor"))),
              "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                          sharding=NamedSharding(mesh, P()))}
    restored = ckpt_lib.Checkpointer(directory).restore(target).state
    assert restored["w"].sharding == target["w"].sharding, restored["w"].sharding
    np.testing.assert_array_equal(restored["w"], np.arange(32.0).reshape(8, 4))
    assert restored["rng"].sharding.spec == P()
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                  jax.random.key_data(jax.random.key(3)))
    print("OK")
""")


def test_restore_reshards_onto_the_target_mesh(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path / "ckpt")],
                        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
