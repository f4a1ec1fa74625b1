"""The saved run config: written once, read back, and inherited except where the user spoke."""

from configs import eval as eval_config
from configs import jigsaw_2x1
from jigsaw_jax import configlib
from jigsaw_jax.runtime import run_config


def test_saved_once_and_inherited_except_explicit_keys(tmp_path):
  run = jigsaw_2x1.get_config("tiny")
  assert run_config.save_first(str(tmp_path), run) is not None
  run.model.preset = "changed later"
  assert run_config.save_first(str(tmp_path), run) is None  # a resume keeps the first start's
  saved = run_config.load(str(tmp_path))
  assert saved.model.preset == "tiny_jigsaw" and saved.data.source.image_size == (198, 198)

  config = eval_config.get_config()  # no :tiny: the paper's preset, native image size
  explicit = configlib.explicit_keys(["--config=configs/eval.py:seed=3",
                                      "--config.data.pipeline.puzzle.prompt_style=paper",
                                      "--config.eval.num_puzzles=5"])
  assert explicit == ["seed", "data.pipeline.puzzle.prompt_style", "eval.num_puzzles"]
  changed = run_config.inherit(config, saved, run_config.FROM_RESTORED_RUN, explicit)
  assert "model.preset" in changed and config.model.preset == "tiny_jigsaw"
  assert config.data.source.image_size == (198, 198) and config.data.source.kind == "bundled"
  assert config.eval.max_new_tokens == saved.eval.max_new_tokens
  assert config.data.pipeline.puzzle.prompt_style == "paper"  # explicit: kept
  assert config.eval.sizes == eval_config.get_config().eval.sizes  # the eval's own choice
  assert isinstance(config.mesh.rules, list)  # untouched (not inherited)


def test_a_run_without_a_saved_config_reads_none(tmp_path):
  assert run_config.load(str(tmp_path)) is None
