"""Decoding: one loop for every decoder of the project.

  loop.py      the `lax.while_loop` over positions (`decode`), its named carry (`DecodeState`)
               and the per-token hook interface (`TokenHook`)
  hooks.py     the plain hooks: sampling (`SamplingHook`, the rollout's) and greedy (`GreedyHook`)
  sampling.py  the token choice from logits: temperature, top-k, top-p, per-row keys
  sampler.py   the entry point for the MLLM: host preparation, prefill, cache layout, `generate`

The other hooks live with their methods: rl/proxy/sampler.py (Proxy-RLHF's accept/reject),
fastmem/decode.py (FastMem's contrastive decoding); fastmem/smollm2.py runs the loop on a text LM.
"""
