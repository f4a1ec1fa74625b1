"""Scale-out: sharded GRPO equals one device, two processes agree, launchers, memory plans.

The pytest process has already started JAX with one CPU device, so the multi-device and
multi-process runs happen in subprocesses (8 simulated devices; two processes with a coordinator
on 127.0.0.1 and gloo CPU collectives) that report JSON.

Tolerances (float32 everywhere; measured maxima in brackets, over the four meshes):
- loss: 1e-6 absolute [1.5e-8]. The loss is a mean of a few hundred terms near 0.17; a sharded
  run only reorders sums.
- gradients: 1e-5 of the largest gradient [6.1e-7]. Partial sums over row shards and over FSDP /
  tensor splits of contracted dimensions are added in another order; float32 rounding of such
  sums is ~1e-7 relative per addition level.
- params after two AdamW updates (lr 1e-3, eps 1e-6): 1e-5 absolute [1.9e-6]. Adam divides each
  update by the gradient's own scale, so the gradient differences above move a parameter by at
  most lr * (difference / (|g| + eps)); with eps 1e-6 that stays ~1e-6. (With eps 1e-8, gradients
  at the float32 noise floor, ~1e-9 here, get normalised to full-size steps of random sign and
  two runs that only sum in another order differ by up to ~1e-4: that is Adam, not sharding.)
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jigsaw_jax.tools import plan as plan_lib
from jigsaw_jax.tools import scale_check

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = ["8,1,1", "2,4,1", "2,2,2", "1,1,8"]


def _env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Four meshes against one device.
# ---------------------------------------------------------------------------------------------

_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    from jigsaw_jax.tools import scale_check
    scale_check._configure_jax(None)
    import jax
    from jigsaw_jax.runtime import sharding as shd
    from jigsaw_jax.rl.grpo import losses
    from jigsaw_jax.rl.optim import make_optimizer
    from jigsaw_jax.rl.policy_steps import PolicySteps

    assert jax.device_count() == 8, jax.devices()
    reference = scale_check.train_two_steps(None)
    report = {}
    for text in sys.argv[1:]:
      result = scale_check.train_two_steps(shd.make_mesh(scale_check.parse_mesh(text)))
      report[text] = dict(scale_check.compare(reference, result), placement=result["placement"])
    # 6 rows cannot be split 8 ways: refused with what to change.
    cfg = scale_check.check_model_config()
    steps = PolicySteps(cfg, losses.LossConfig(), make_optimizer(1e-3, 10),
                        mesh=shd.make_mesh((8, 1, 1)))
    seq, _ = scale_check.synthetic_batch(cfg, prompts=3, group=2)
    try:
      steps.shard_batch(seq)
      report["indivisible"] = ""
    except ValueError as e:
      report["indivisible"] = str(e)
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def mesh_report():
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, *MESHES], cwd=REPO, env=_env(8),
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))
  return json.loads(line[len("REPORT"):])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_grpo_steps_equal_one_device(mesh_report, mesh):
  got = mesh_report[mesh]
  assert got["loss_abs"] <= 1e-6, got
  assert got["grads_rel"] <= 1e-5, got
  assert got["params_abs"] <= 1e-5, got


@pytest.mark.slow
@pytest.mark.parametrize("mesh, q_proj", [
    ("8,1,1", "P('fsdp', 'tensor', None)"),
    ("2,4,1", "P('fsdp', 'tensor', None)"),
    ("2,2,2", "P('fsdp', 'tensor', None)"),
    # 4 query heads do not split 8 ways: that dimension is replicated, the rest stays sharded.
    ("1,1,8", "P('fsdp', None, None)"),
])
def test_state_and_batch_are_really_sharded(mesh_report, mesh, q_proj):
  placement = mesh_report[mesh]["placement"]
  assert placement["mesh"] == dict(zip(("data", "fsdp", "tensor"),
                                       scale_check.parse_mesh(mesh)))
  assert placement["q_proj_kernel"] == q_proj
  assert placement["adam_mu_q_proj_kernel"] == q_proj  # Adam's moments follow their params
  assert placement["ref_logp"] == "P(('data', 'fsdp'), None)"  # rows over the data-like axes
  assert placement["activation_constraints"]


@pytest.mark.slow
def test_rows_that_do_not_split_are_refused_clearly(mesh_report):
  message = mesh_report["indivisible"]
  assert "6 rows" in message and "multiple of 8" in message


# ---------------------------------------------------------------------------------------------
# Two processes.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_two_steps_and_agree(tmp_path, capsys):
  port = _free_port()
  entry = [sys.executable, "-m", "jigsaw_jax.tools.scale_check"]
  procs = [subprocess.Popen(
      entry + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}", "--mesh=1,-1,1", f"--out={tmp_path}/process_{i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  procs.append(subprocess.Popen(entry + ["--single_device", f"--out={tmp_path}/single"],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True))
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=900)
      assert proc.returncode == 0, err[-4000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  summaries = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  assert [s["process_id"] for s in summaries] == [0, 1]
  assert all(s["process_count"] == 2 and s["devices"] == 4 for s in summaries)
  # FSDP across the two processes: each holds a quarter of every sharded param.
  assert summaries[0]["placement"]["q_proj_kernel"] == "P('fsdp', 'tensor', None)"
  assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
  assert summaries[0]["loss"] == summaries[1]["loss"] and len(summaries[0]["loss"]) == 2
  single = json.loads((tmp_path / "single.json").read_text())
  np.testing.assert_allclose(summaries[0]["loss"], single["loss"], atol=1e-6)
  status = scale_check.compare_files([str(tmp_path / f"process_{i}.json") for i in range(2)],
                                     reference=str(tmp_path / "single.json"), atol=1e-5)
  assert status == 0, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


def _dry_run(args, env=None):
  proc = subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_local_multiprocess_dry_run():
  out = _dry_run(["launch/local_multiprocess.sh", "--dry-run", "--port", "23456"])
  for expected in ["-m jigsaw_jax.tools.scale_check", "--coordinator_address=127.0.0.1:23456",
                   "--num_processes=2", "--process_id=0", "--process_id=1",
                   "XLA_FLAGS=--xla_force_host_platform_device_count=2", "--single_device",
                   "--compare"]:
    assert expected in out, out
  out = _dry_run(["launch/local_multiprocess.sh", "--dry-run", "-n", "3", "--",
                  "--config=configs/jigsaw_2x1.py:tiny", "--workdir=/tmp/x"])
  assert out.count("-m jigsaw_jax.main --config=configs/jigsaw_2x1.py:tiny") == 3, out
  assert "--config.distributed.process_id=2" in out
  assert "--config.distributed.num_processes=3" in out


def test_tpu_pod_dry_run():
  out = _dry_run(["launch/tpu_pod.sh", "--dry-run"], env={"ACCELERATOR_TYPE": "v5litepod-16"})
  for expected in ["gcloud compute tpus tpu-vm create", "--accelerator-type=v5litepod-16",
                   "tpu-vm scp", "tpu-vm ssh", "--worker=all", "jax[tpu]",
                   "-m jigsaw_jax.main", "--config.distributed.auto_detect=True",
                   "HF_HUB_OFFLINE=1"]:
    assert expected in out, out
  assert "delete" not in out  # only on request
  assert "tpu-vm delete" in _dry_run(["launch/tpu_pod.sh", "--dry-run", "delete"])


def test_slurm_dry_run():
  for args, env in [(["--dry-run"], {}), ([], {"DRY_RUN": "1"})]:
    out = _dry_run(["launch/slurm_gpu.sbatch", *args], env)
    for expected in ["srun", "--ntasks=2", "-m jigsaw_jax.main",
                     "--config.distributed.coordinator_address=gpu-node01:12355",
                     "--config.distributed.num_processes=2",
                     "--config.distributed.process_id=${SLURM_PROCID}",
                     '"--config.mesh.dcn_shape=(2,1,1)"']:
      assert expected in out, out
  # Inside an allocation the coordinator is the first host of the node list.
  out = _dry_run(["launch/slurm_gpu.sbatch", "--dry-run"], {
      "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_NNODES": "4",
      "SLURM_NTASKS": "4", "SLURM_SUBMIT_DIR": str(REPO)})
  assert "coordinator_address=gpu12:12355" in out and "--ntasks=4" in out, out


def test_slurm_script_outside_slurm_refuses_to_run():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
  proc = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=env)
  assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Memory plans.
# ---------------------------------------------------------------------------------------------


def test_optimizer_state_follows_params():
  import jax
  from jax.sharding import PartitionSpec
  from jigsaw_jax.runtime import sharding as shd
  from jigsaw_jax.rl.optim import make_optimizer

  params = {"a": {"kernel": jax.ShapeDtypeStruct((4, 8), np.float32)},
            "b": jax.ShapeDtypeStruct((8,), np.float32)}
  shardings = {"a": {"kernel": "sharding-of-a"}, "b": "sharding-of-b"}
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  for tx in [make_optimizer(1e-3, 10),
             make_optimizer(1e-3, 10, mask={"a": {"kernel": True}, "b": False})]:
    placed = shd.optimizer_state_shardings(tx, params, shardings, mesh)
    leaves = jax.tree.leaves(placed)
    assert leaves.count("sharding-of-a") == 2  # mu and nu
    assert leaves.count("sharding-of-b") in (0, 2)  # masked out, or its mu and nu
    # Step counts are replicated.
    assert all(leaf.spec == PartitionSpec() for leaf in leaves if not isinstance(leaf, str))


def test_plan_table_says_what_fits():
  gib = plan_lib.GIB
  row = dict(preset="qwen2_5_vl_3b", mesh="(1,8,1)", micro_batches=64, rows_per_device=1,
             params=2 * gib, opt_state=4 * gib, ref_params=2 * gib, grads=2 * gib,
             grads_temp=3 * gib, update_temp=0, kv_cache=gib, prefill_temp=gib,
             decode_temp=gib, train_peak=14 * gib, rollout_peak=10 * gib)
  table = plan_lib.format_table([row, dict(row, train_peak=40 * gib)])
  lines = table.splitlines()
  assert lines[0].startswith("| preset | mesh (d,f,t)") and len(lines) == 4
  assert lines[2].endswith("v5e (16 GiB), v4 (32 GiB), H100 (80 GiB) |")
  assert lines[3].endswith("| H100 (80 GiB) |")


@pytest.mark.slow
def test_plan_compiles_abstract_shapes_on_simulated_devices(tmp_path):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, "-m", "jigsaw_jax.tools.plan", "--config=configs/jigsaw_2x1.py:tiny",
       "--devices=8", "--mesh=1,8,1", "--preset=tiny", "--image_tokens=16", "--text_tokens=8",
       f"--json={out}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| tiny | (1,8,1) |" in proc.stdout
  (got,) = json.loads(out.read_text())
  from jigsaw_jax.models import presets
  total_param_bytes = presets.count_params("tiny") * 4
  # FSDP over 8: about an eighth each (norm scales and indivisible dims stay whole).
  assert total_param_bytes / 8 <= got["params"] < total_param_bytes / 4
  assert got["opt_state"] >= 2 * got["params"]
  assert got["grads_temp"] > 0 and got["decode_temp"] > 0 and got["prefill_temp"] > 0
  # The prompt KV cache is exact: one row per distinct prompt (its G samples share it), the
  # miniature's 16 prompts over 8 devices, 4 layers x (k, v), 2 KV heads x 32 dims in float32,
  # prompt 16 + 8 + 2 tokens; plus the [rows, S] key mask and the write index. The decode's own
  # slots for the new tokens are temporaries of the decode program.
  from jigsaw_jax import configlib
  prompts = configlib.load_config_file("configs/jigsaw_2x1.py:tiny").data.pipeline.prompts_per_batch
  rows, length = prompts // 8, 16 + 8 + 2
  assert got["kv_cache"] == 4 * 2 * rows * 2 * length * 32 * 4 + rows * length + 4
