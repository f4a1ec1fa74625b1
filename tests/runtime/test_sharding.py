"""Meshes, logical-axis rules and sharded init, on 8 simulated CPU devices.

The pytest process has already initialised JAX with whatever devices it found, so the multi-device
checks run once in a subprocess started with `--xla_force_host_platform_device_count=8` and report
their findings as JSON; the tests below assert on that report.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from jigsaw_jax.runtime import sharding as shd

REPO = pathlib.Path(__file__).resolve().parents[2]

_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jigsaw_jax.runtime import sharding as shd

    assert jax.device_count() == 8, jax.devices()
    init = nn.initializers.normal(0.02)

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, ids):
        table = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                           (64, 16))
        x = nn.with_logical_constraint(table[ids], ("activation_batch", "activation_length",
                                                    "activation_embed"))
        dense = lambda n, names, name: nn.Dense(
            n, use_bias=False, name=name, kernel_init=nn.with_logical_partitioning(init, names))
        h = nn.with_logical_constraint(dense(32, ("embed", "mlp"), "up")(x),
                                       ("activation_batch", "activation_length", "activation_mlp"))
        x = x + dense(16, ("mlp", "embed"), "down")(jax.nn.gelu(h))
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (16,))
        return (x * scale) @ table.T

    model, tx = Tiny(), optax.adamw(1e-3)
    ids = jnp.arange(16 * 4).reshape(16, 4) % 64

    def init_fn(rng):
      params = model.init(rng, ids)["params"]
      return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    reference = jax.jit(lambda r: nn.meta.unbox(init_fn(r)))(jax.random.key(0))
    ref_logits = model.apply({"params": reference["params"]}, ids)
    spec = lambda s: [list(a) if isinstance(a, tuple) else a for a in s.spec]
    report = {}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), (2, -1, 1)]:
      mesh = shd.make_mesh(shape)
      # Created directly in its shards, as the trainer creates params and optimizer state.
      shardings = shd.logical_to_sharding(jax.eval_shape(init_fn, jax.random.key(0)), mesh,
                                          shd.DEFAULT_RULES)
      with shd.mesh_context(mesh, shd.DEFAULT_RULES):
        state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)),
                        out_shardings=shardings)(jax.random.key(0))
      params = state["params"]
      mu = state["opt_state"][0].mu
      with shd.mesh_context(mesh, shd.DEFAULT_RULES):
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        lowered = forward.lower(params, ids)
        hlo, logits = lowered.as_text(), lowered.compile()(params, ids)
      batch = {"ids": shd.place(np.asarray(ids), shd.rows_sharding(mesh, 2))}
      kv = jax.eval_shape(lambda: {"k": nn.LogicallyPartitioned(
          jnp.zeros((16, 2, 8)), ("embed", "kv_heads", "head_dim"))})
      kv_spec = spec(shd.logical_to_sharding(kv, mesh, shd.DEFAULT_RULES)["k"])
      try:
        shd.logical_to_sharding(kv, mesh, shd.DEFAULT_RULES, replicate_indivisible=False)
        kv_error = ""
      except ValueError as e:
        kv_error = str(e)
      report[str(shape)] = {
          "mesh": dict(mesh.shape),
          "axis_types": [str(t) for t in mesh.axis_types],
          "specs": {k: spec(v) for k, v in [
              ("embedding", params["embedding"].sharding),
              ("up", params["up"]["kernel"].sharding),
              ("down", params["down"]["kernel"].sharding),
              ("scale", params["scale"].sharding),
              ("mu_up", mu["up"]["kernel"].sharding),
              ("step", state["step"].sharding)]},
          "planned_equals_placed": bool(
              params["up"]["kernel"].sharding == shardings["params"]["up"]["kernel"]),
          "init_equals_unsharded": all(
              bool(np.array_equal(a, b)) for a, b in
              zip(jax.tree.leaves(state), jax.tree.leaves(reference))),
          "logits_match": bool(np.allclose(logits, ref_logits, atol=1e-6)),
          "constraint_in_hlo": "sharding_constraint" in hlo or "@Sharding" in hlo,
          "batch_spec": spec(batch["ids"].sharding),
          "batch_equal": bool(np.array_equal(batch["ids"], ids)),
          "kv_spec": kv_spec,
          "kv_error": kv_error,
      }
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def eight_device_report():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICE_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))
  return json.loads(line[len("REPORT"):])


MESHES = {"(8, 1, 1)": {"data": 8, "fsdp": 1, "tensor": 1},
          "(2, 4, 1)": {"data": 2, "fsdp": 4, "tensor": 1},
          "(2, 2, 2)": {"data": 2, "fsdp": 2, "tensor": 2},
          "(1, 1, 8)": {"data": 1, "fsdp": 1, "tensor": 8},
          "(2, -1, 1)": {"data": 2, "fsdp": 4, "tensor": 1}}


@pytest.mark.parametrize("shape", list(MESHES))
def test_mesh_shapes_resolve_with_auto_axes(eight_device_report, shape):
  got = eight_device_report[shape]
  assert got["mesh"] == MESHES[shape]
  assert all("Auto" in t for t in got["axis_types"])


@pytest.mark.parametrize("shape", list(MESHES))
def test_params_and_optimizer_state_are_created_with_rule_shardings(eight_device_report, shape):
  got = eight_device_report[shape]
  assert got["specs"] == {
      "embedding": ["tensor", "fsdp"],   # (vocab, embed)
      "up": ["fsdp", "tensor"],          # (embed, mlp)
      "down": ["tensor", "fsdp"],        # (mlp, embed)
      "scale": [None],                   # (norm,)
      "mu_up": ["fsdp", "tensor"],       # Adam moments follow their params
      "step": [],                        # unannotated leaves are replicated
  }
  assert got["planned_equals_placed"]
  # Sharding changes where numbers live, never what they are.
  assert got["init_equals_unsharded"]
  assert got["logits_match"]
  assert got["constraint_in_hlo"]


def test_indivisible_dimension_is_replicated_or_refused(eight_device_report):
  # Two KV heads cannot be split 8 ways (Qwen2.5-3B on tensor=8): replicate that dim only.
  assert eight_device_report["(1, 1, 8)"]["kv_spec"] == ["fsdp", None, None]
  assert "not divisible by mesh axes tensor (8 devices)" in (
      eight_device_report["(1, 1, 8)"]["kv_error"])
  assert eight_device_report["(2, 2, 2)"]["kv_spec"] == ["fsdp", "tensor", None]
  assert eight_device_report["(2, 2, 2)"]["kv_error"] == ""


@pytest.mark.parametrize("shape", list(MESHES))
def test_host_local_batch_becomes_global(eight_device_report, shape):
  got = eight_device_report[shape]
  assert got["batch_spec"] == [["data", "fsdp"], None]  # rows split, columns whole
  assert got["batch_equal"]


@pytest.mark.parametrize("shape, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((1, 1, -1), 8, (1, 1, 8)),
    ((2, 2, 2), 8, (2, 2, 2)),
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert shd.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, message", [
    ((2, 2, 1), "needs 4 devices but 8 are available"),
    ((3, -1, 1), "does not divide the 8 devices"),
    ((-1, -1, 1), "at most one -1"),
    ((8, 1), "one size per axis"),
])
def test_bad_mesh_shape_is_refused_clearly(shape, message):
  with pytest.raises(ValueError, match=message):
    shd.resolve_mesh_shape(shape, 8)


def test_mesh_with_wrong_device_count_is_refused():
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"but {n} are available"):
    shd.make_mesh((n + 1, 1, 1))


def test_mesh_from_config():
  config = ml_collections.ConfigDict({"shape": (1, -1, 1), "dcn_shape": None})
  mesh = shd.mesh_from_config(config)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


def test_hybrid_mesh_puts_slices_along_data():
  # Two 4-chip slices; only `data` crosses the slow network.
  devices = [SimpleNamespace(id=i, process_index=i // 4, slice_index=i // 4, platform="cpu",
                             device_kind="fake") for i in range(8)]
  array = shd.device_array((1, -1, 1), devices, dcn_shape=(2, 1, 1))
  assert array.shape == (2, 4, 1)
  assert [{d.slice_index for d in row.ravel()} for row in array] == [{0}, {1}]
  with pytest.raises(ValueError, match="must divide"):
    shd.device_array((1, -1, 1), devices, dcn_shape=(3, 1, 1))


class _Annotated(nn.Module):
  names: tuple

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.zeros, self.names)
    return x @ self.param("w", init, (x.shape[-1], 4))


def _abstract(names):
  return jax.eval_shape(_Annotated(names).init, jax.random.key(0), np.zeros((1, 4), np.float32))


def test_unknown_logical_name_is_refused_with_its_name():
  mesh = shd.make_mesh((-1, 1, 1))
  with pytest.raises(ValueError, match=r"\['embd'\] have no sharding rule"):
    shd.logical_to_sharding(_abstract(("embd", "mlp")), mesh, shd.DEFAULT_RULES)


def test_rule_naming_a_missing_mesh_axis_is_refused():
  mesh = shd.make_mesh((-1, 1, 1))
  rules = list(shd.DEFAULT_RULES) + [("experts", "expert")]
  with pytest.raises(ValueError, match="mesh axes \\['expert'\\]"):
    shd.logical_to_sharding(_abstract(("embed", "mlp")), mesh, rules)


def test_rules_from_config_lists_are_normalised():
  rules = shd.normalize_rules([["activation_batch", ["data", "fsdp"]], ["norm", None]])
  assert rules == (("activation_batch", ("data", "fsdp")), ("norm", None))
  with pytest.raises(ValueError, match="Bad logical-axis rule"):
    shd.normalize_rules([("embed",)])


def test_single_process_runs_leave_distributed_alone(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert not shd.maybe_initialize_distributed(SimpleNamespace(coordinator_address=""))
  assert not shd.maybe_initialize_distributed({})
  assert calls == []


def test_configured_multi_process_run_initialises(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  config = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
  assert shd.maybe_initialize_distributed(config)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                    "process_id": 2}]
  with pytest.raises(ValueError, match="num_processes"):
    shd.maybe_initialize_distributed({"coordinator_address": "10.0.0.1:1234"})


_WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jigsaw_jax.runtime import sharding as shd

    process_id, port = int(sys.argv[1]), sys.argv[2]
    assert shd.maybe_initialize_distributed({"coordinator_address": f"127.0.0.1:{port}",
                                             "num_processes": 2, "process_id": process_id})
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = shd.make_mesh((-1, 1, 1))
    rows = np.arange(4 * 3).reshape(4, 3) + 100 * process_id  # this host's shard of the batch
    batch = shd.place(rows, shd.rows_sharding(mesh, 2))
    total = jax.jit(lambda a: a.sum(axis=0),
                    out_shardings=NamedSharding(mesh, PartitionSpec()))(batch)
    print("RESULT" + json.dumps({"shape": list(batch.shape), "devices": jax.device_count(),
                                 "sum": np.asarray(total).tolist()}))
""")


def test_two_processes_assemble_one_global_batch(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, err[-4000:]
      outputs.append(json.loads(next(l for l in out.splitlines()
                                     if l.startswith("RESULT"))[len("RESULT"):]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  # 4 rows from each host make one 8-row batch over 4 devices; both hosts see the same sum.
  rows = np.concatenate([np.arange(12).reshape(4, 3) + 100 * i for i in range(2)])
  for got in outputs:
    assert got == {"shape": [8, 3], "devices": 4, "sum": rows.sum(axis=0).tolist()}
