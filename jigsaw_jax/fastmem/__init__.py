"""FastMem (Zhu et al., 2024): memorise the prompt before answering.

    memorize.py      the method: which FFN trains, the loss, the jitted steps, `FastMem`
    decode.py        greedy and contrastive (FastMem+CD) decoding on the shared decode loop
    smollm2.py       the real text LM that ships in a package (SmolLM2-135M-Instruct), via gguf.py
    faithfulness.py  the context-faithfulness items and their scoring; cli.py runs them
"""

from jigsaw_jax.fastmem.decode import ContrastiveHook, GreedyDecoder, contrastive_logits
from jigsaw_jax.fastmem.memorize import (CHATML, FastMem, FastMemConfig, MemoryStats,
                                         MemoryTemplate, as_model_params, decoder_variables,
                                         ffn_layer_names, get_ffn, memorization_loss,
                                         memory_template, memory_tokens, objective, reference,
                                         text_model_config, text_prompt, with_ffn)
