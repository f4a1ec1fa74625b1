"""FastMem: memorise the prompt's context for a few steps before answering (Zhu et al., 2024).

The official algorithm (IAAR-Shanghai/FastMem, `src/train_and_inference.py`), per test example:

1. Start from the original weights (restored before every example).
2. Train only the feed-forward blocks (gate/up/down) of the last `layers` decoder layers.
3. The memorised text is the context alone, wrapped as an assistant turn:
   `<|im_start|>assistant\\n` + context + `<|im_end|>` (ChatML; Llama-3's header/eot likewise).
   The loss covers every token after the header, the end-of-turn token included:
       L = mean CE(logits_θ, next tokens) + λ · mean_pos KL(p_ref ‖ p_θ),
   with p_ref the softmax of the step-0 (original-weight) logits on the same text.
4. AdamW (β 0.9/0.999, eps 1e-8, weight decay 0.01, constant lr), gradient clip 1.0, a fresh
   optimiser per example, `steps` updates on the one sequence.
5. Greedy decoding of the normal prompt (context + question) with the updated weights.
   FastMem+CD decodes with (1 + α)·z_mem − α·z_orig, the original weights' logits z_orig coming
   from a second pass with its own KV cache (α = 0.5 in the paper).

The efficiency trick (official too): the frozen trunk runs once (`tap_layer`) and the jitted steps
rerun only the trained layers → final norm → LM head on the cached residual stream
(`first_layer`); the step-0 logits of that same pass give p_ref.

Weights are never mutated: every example starts from the `params` passed in and the adapted
parameters are a new pytree sharing every unchanged leaf, so "restoring" costs nothing.

    fm = FastMem.for_text_lm(text_cfg, tokenizer, FastMemConfig(learning_rate=1e-5, steps=10))
    params = as_model_params(decoder_params)           # or a VisionLanguageModel's variables
    answer_ids, stats = fm.answer(params, context, text_prompt(prompt_ids))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jigsaw_jax.fastmem.decode import GreedyDecoder
from jigsaw_jax.models.config import ModelConfig, TextConfig
from jigsaw_jax.models.decoder import TextDecoder
from jigsaw_jax.models.processing import PromptInputs, bucket_length, collate

Params = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FastMemConfig:
  """FastMem's knobs; defaults are the paper's QA setting (Llama-3-8B-Instruct)."""

  learning_rate: float = 1e-5
  steps: int = 10  # gradient steps on the memorised text (the official `num_train_epochs`)
  kl_weight: float = 0.1  # λ
  layers: int = 1  # FFNs of the last `layers` decoder layers are trained (`train_layer`)
  cd_alpha: float = 0.0  # > 0: FastMem+CD with this α (the paper uses 0.5)
  weight_decay: float = 0.01  # torch AdamW's default, which the official optimiser keeps
  grad_clip: float = 1.0  # HF Trainer's max_grad_norm
  max_tokens: int = 8192  # memorised text is truncated to this many tokens (model_max_length)

  def __post_init__(self):
    if self.steps < 0 or self.layers < 1:
      raise ValueError(f"FastMem needs steps >= 0 and layers >= 1; got steps={self.steps}, "
                       f"layers={self.layers}.")

  @classmethod
  def from_config(cls, c) -> "FastMemConfig":
    """From `config.eval.fastmem` (a ConfigDict or mapping; `enabled` is ignored here)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(c)
    unknown = set(values) - fields - {"enabled"}
    if unknown:
      raise KeyError(f"Unknown FastMem setting(s) {sorted(unknown)}; valid: {sorted(fields)}.")
    return cls(**{k: v for k, v in values.items() if k in fields})


# ---------------------------------------------------------------------------------------------
# The memorised text: the context as an assistant turn, header excluded from the loss.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryTemplate:
  header: str  # before the context; never in the loss (BOS + assistant header)
  end: str  # after the context; in the loss (the end-of-turn token)


CHATML = MemoryTemplate("<|im_start|>assistant\n", "<|im_end|>")  # Qwen, SmolLM2
LLAMA3 = MemoryTemplate("<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n",
                        "<|eot_id|>")


def memory_template(tokenizer) -> MemoryTemplate:
  """The assistant-turn wrapping of a chat tokenizer, recognised by its special tokens."""
  vocab = tokenizer.get_vocab()
  if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
    return CHATML
  if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
    return LLAMA3
  raise ValueError("FastMem does not know this tokenizer's chat format (expected ChatML's "
                   "<|im_start|>/<|im_end|> or Llama-3's <|start_header_id|>/<|eot_id|>); pass "
                   "template=MemoryTemplate(header=..., end=...).")


def memory_tokens(tokenizer, context: str, template: Optional[MemoryTemplate] = None,
                  max_tokens: int = 8192) -> Tuple[np.ndarray, np.ndarray]:
  """(ids int32 [T], in_loss bool [T]): the wrapped context; in_loss marks the predicted tokens
  (the context and the end-of-turn token, not the header). Long contexts are cut to fit."""
  template = template or memory_template(tokenizer)
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  header, body, end = encode(template.header), encode(context), encode(template.end)
  body = body[:max(0, max_tokens - len(header) - len(end))]
  if not body:
    raise ValueError("FastMem needs a non-empty context to memorise.")
  ids = np.asarray(header + body + end, np.int32)
  in_loss = np.arange(len(ids)) >= len(header)
  return ids, in_loss


# ---------------------------------------------------------------------------------------------
# The trainable block: the last layers' FFNs, read from and written into a params tree.
# ---------------------------------------------------------------------------------------------


def _decoder_tree(params: Params) -> Dict[str, Any]:
  """The decoder's parameters inside a TextDecoder tree or a VisionLanguageModel tree."""
  inner = params["params"]
  return inner["decoder"] if "decoder" in inner else inner


def decoder_variables(params: Params) -> Params:
  """The TextDecoder's variables out of a VisionLanguageModel tree (or a TextDecoder tree as it
  is): 'params' plus any other collection (a trained adapter's) at the decoder's path."""
  if "decoder" not in params["params"]:
    return params
  return {name: tree["decoder"] for name, tree in params.items()
          if isinstance(tree, dict) and "decoder" in tree}


def ffn_layer_names(num_layers: int, layers: int) -> Tuple[str, ...]:
  if not 1 <= layers <= num_layers:
    raise ValueError(f"FastMem trains the FFNs of the last `layers` layers; got layers={layers} "
                     f"for a decoder of {num_layers} layers.")
  return tuple(f"layers_{i}" for i in range(num_layers - layers, num_layers))


def get_ffn(params: Params, names: Sequence[str]) -> Dict[str, Any]:
  """{'layers_i': {'gate_proj': {'kernel'}, 'up_proj': ..., 'down_proj': ...}} of those layers."""
  tree = _decoder_tree(params)
  return {name: tree[name]["mlp"] for name in names}


def with_ffn(params: Params, ffn: Dict[str, Any]) -> Params:
  """A new params tree with these FFNs; every other leaf is shared, `params` is untouched."""
  tree = dict(_decoder_tree(params))
  for name, mlp in ffn.items():
    tree[name] = {**tree[name], "mlp": mlp}
  if "decoder" in params["params"]:
    return {**params, "params": {**params["params"], "decoder": tree}}
  return {**params, "params": tree}


# ---------------------------------------------------------------------------------------------
# The objective and the jitted memorisation loop.
# ---------------------------------------------------------------------------------------------


def memorization_loss(logits: jax.Array, ref_logprobs: jax.Array, targets: jax.Array,
                      weights: jax.Array, kl_weight: float) -> Tuple[jax.Array, Tuple]:
  """mean CE + λ·mean KL(p_ref ‖ p_θ) over the weighted positions; returns (loss, (ce, kl)).

  logits / ref_logprobs [B, T, V] predict targets [B, T]; weights [B, T] are 1 on loss positions.
  """
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  count = jnp.maximum(weights.sum(), 1.0)
  ce = -jnp.sum(jnp.take_along_axis(logprobs, targets[..., None], -1)[..., 0] * weights) / count
  kl_pos = jnp.sum(jnp.exp(ref_logprobs) * (ref_logprobs - logprobs), axis=-1)
  kl = jnp.sum(kl_pos * weights) / count
  return ce + kl_weight * kl, (ce, kl)


def objective(model: TextDecoder, params: Params, ffn: Dict[str, Any], inputs: jax.Array,
              positions: jax.Array, attn_mask: jax.Array, first_layer: int,
              ref_logprobs: jax.Array, targets: jax.Array, weights: jax.Array,
              kl_weight) -> Tuple[jax.Array, Tuple]:
  """The FastMem loss of `ffn` put into `params`, run from layer `first_layer` on `inputs` (token
  ids with first_layer=0, or the cached residual stream entering that layer)."""
  logits = model.apply(with_ffn(params, ffn), inputs, positions, attn_mask,
                       first_layer=first_layer).logits
  return memorization_loss(logits[:, :-1], ref_logprobs, targets, weights, kl_weight)


def reference(model: TextDecoder, params: Params, ids: jax.Array, attn_mask: jax.Array,
              first_layer: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """One full forward with the original weights: (positions, the residual stream entering
  `first_layer`, log p_ref [B, T-1, V]), all without gradient."""
  positions = _positions(model.cfg, *ids.shape)
  out = model.apply(params, ids, positions, attn_mask, tap_layer=first_layer)
  ref_logprobs = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
  return positions, jax.lax.stop_gradient(out.tapped), jax.lax.stop_gradient(ref_logprobs)


def _positions(cfg: TextConfig, batch: int, length: int) -> jax.Array:
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return pos if cfg.mrope_section is None else jnp.broadcast_to(pos, (3, batch, length))


@functools.partial(jax.jit, static_argnames=("model", "layers", "segments"))
def _memorize(params, ids, attn_mask, in_loss, hyper, *, model: TextDecoder, layers: int,
              segments: Tuple[int, ...]):
  """Runs sum(segments) FastMem steps; returns (the FFNs after each segment, ce [S], kl [S]).

  params is a TextDecoder tree {'params': ...}; ids / attn_mask / in_loss are [1, T] (right
  padding, masked out of attention and loss); hyper holds float32 scalars (learning_rate,
  kl_weight, weight_decay, grad_clip), traced so that a grid search compiles once.
  """
  learning_rate, kl_weight, weight_decay, grad_clip = hyper
  names = ffn_layer_names(model.cfg.num_layers, layers)
  first = model.cfg.num_layers - layers
  # The frozen trunk, once: the residual stream entering the first trained layer, and the
  # original model's log-probs on the memorised text (p_ref).
  positions, trunk, ref_logprobs = reference(model, params, ids, attn_mask, first)
  targets, weights = ids[:, 1:], (in_loss[:, 1:] & (attn_mask[:, 1:] > 0)).astype(jnp.float32)
  loss_fn = functools.partial(objective, model, params, inputs=trunk, positions=positions,
                              attn_mask=attn_mask, first_layer=first, ref_logprobs=ref_logprobs,
                              targets=targets, weights=weights, kl_weight=kl_weight)

  optimizer = optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))

  def step(carry, _):
    ffn, opt_state = carry
    (_, (ce, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ffn)
    updates, opt_state = optimizer.update(grads, opt_state, ffn)
    return (optax.apply_updates(ffn, updates), opt_state), (ce, kl)

  # Trained in float32 whatever the storage dtype (the official run keeps fp32 master weights).
  ffn = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), get_ffn(params, names))
  carry = (ffn, optimizer.init(ffn))  # a fresh optimiser for every example
  snapshots, ces, kls = [], [], []
  for length in segments:
    carry, (ce, kl) = jax.lax.scan(step, carry, None, length=length)
    snapshots.append(carry[0])
    ces.append(ce)
    kls.append(kl)
  return tuple(snapshots), jnp.concatenate(ces), jnp.concatenate(kls)


class MemoryStats(NamedTuple):
  ce: np.ndarray  # [steps]: mean CE on the memorised text before each update (ce[0]: original)
  kl: np.ndarray  # [steps]: mean KL(p_ref ‖ p_θ) before each update


# ---------------------------------------------------------------------------------------------
# The per-example runner.
# ---------------------------------------------------------------------------------------------


def text_model_config(cfg: TextConfig, dtype: str = "float32") -> ModelConfig:
  """A text LM as a VisionLanguageModel without a vision tower."""
  return ModelConfig(text=cfg, vision=None, dtype=dtype, param_dtype=dtype)


def as_model_params(decoder_params: Params) -> Params:
  """TextDecoder params {'params': {...}} -> VisionLanguageModel params {'params': {'decoder'}}."""
  return {"params": {"decoder": decoder_params["params"]}}


def text_prompt(ids: Sequence[int]) -> PromptInputs:
  """A text-only prompt for GreedyDecoder / collate."""
  return PromptInputs(np.asarray(ids, np.int32), np.zeros((0, 1), np.float32),
                      np.zeros((0, 3), np.int32))


class FastMem:
  """Memorise each example's context, then answer it greedily (FastMem or FastMem+CD).

      fm = FastMem(model_cfg, tokenizer, FastMemConfig(...), max_new_tokens=100,
                   eos_ids=..., pad_id=...)
      ids, stats = fm.answer(params, context, prompt)    # params: VisionLanguageModel tree

  `memorize` and `decode` take an optional FastMemConfig that overrides the one given here: the
  learning rate and λ are traced, so a grid search over them compiles once per shape.
  """

  def __init__(self, model_cfg: ModelConfig, tokenizer, fm: FastMemConfig, *,
               max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
               suppress_ids: Sequence[int] = (), template: Optional[MemoryTemplate] = None,
               bucket: int = 32):
    self.model_cfg = model_cfg
    self.tokenizer = tokenizer
    self.fm = fm
    self.template = template or memory_template(tokenizer)
    self.bucket = bucket
    self.pad_id = int(pad_id)
    # The policy's decoder, with its adapter if it has one (FastMem then trains the base FFN
    # kernels under the frozen adapter).
    adapter = getattr(model_cfg, "adapter", None)
    self.decoder = TextDecoder(model_cfg.text, model_cfg.dtype, model_cfg.param_dtype, False,
                               model_cfg.attention_impl,
                               **({"adapter": adapter} if adapter is not None else {}))
    self._decoder_args = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                              suppress_ids=suppress_ids)
    self._decoders: Dict[float, GreedyDecoder] = {}

  @classmethod
  def for_text_lm(cls, cfg: TextConfig, tokenizer, fm: FastMemConfig, *,
                  max_new_tokens: int = 100, **kwargs) -> "FastMem":
    """For a plain text LM (TextDecoder params: wrap them with `as_model_params`)."""
    vocab = tokenizer.get_vocab()
    eos = {tokenizer.eos_token_id, vocab.get("<|im_end|>"), vocab.get("<|eot_id|>")} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = {"eos_ids": sorted(eos), "pad_id": pad, **kwargs}
    return cls(text_model_config(cfg), tokenizer, fm, max_new_tokens=max_new_tokens, **kwargs)

  def memorize(self, params: Params, context: str, fm: Optional[FastMemConfig] = None,
               segments: Optional[Sequence[int]] = None) -> Tuple[List[Params], MemoryStats]:
    """Adapted parameters after each segment of steps (default: one segment of fm.steps),
    starting from `params` (never modified), and the loss trajectory."""
    if not isinstance(params, dict) or "params" not in params:
      raise TypeError("FastMem memorises into the policy's variables {'params': ...}; got "
                      f"{type(params).__name__}. (A frozen policy plus a separate network, such "
                      "as Proxy-RLHF's pair, is not supported.)")
    fm = fm or self.fm
    segments = tuple(int(s) for s in (segments or (fm.steps,)))
    ids, in_loss = memory_tokens(self.tokenizer, context, self.template, fm.max_tokens)
    pad = bucket_length(len(ids), self.bucket) - len(ids)
    row = lambda x, fill: np.pad(x, (0, pad), constant_values=fill)[None]
    hyper = tuple(np.float32(v) for v in (fm.learning_rate, fm.kl_weight, fm.weight_decay,
                                          fm.grad_clip))
    ffns, ce, kl = _memorize(decoder_variables(params), row(ids, self.pad_id),
                             row(np.ones(len(ids), np.int32), 0), row(in_loss, False), hyper,
                             model=self.decoder, layers=fm.layers, segments=segments)
    return [with_ffn(params, f) for f in ffns], MemoryStats(np.asarray(ce), np.asarray(kl))

  def decode(self, adapted: Params, original: Params, prompts: Sequence[PromptInputs],
             alpha: Optional[float] = None) -> List[List[int]]:
    """Greedy completions with the adapted weights, contrasted with the original ones when
    alpha (default fm.cd_alpha) > 0. decode(params, params, prompts, 0.0) is plain greedy."""
    alpha = self.fm.cd_alpha if alpha is None else float(alpha)
    if alpha not in self._decoders:
      self._decoders[alpha] = GreedyDecoder(self.model_cfg, alpha=alpha, **self._decoder_args)
    batch = collate(list(prompts), self.pad_id, self.bucket)
    return self._decoders[alpha](adapted, batch, original)

  def answer(self, params: Params, context: str, prompt: PromptInputs
             ) -> Tuple[List[int], MemoryStats]:
    """Memorise `context`, then decode `prompt` (which holds the context and the question)."""
    (adapted,), stats = self.memorize(params, context)
    return self.decode(adapted, params, [prompt])[0], stats
