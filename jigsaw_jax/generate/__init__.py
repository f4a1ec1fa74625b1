"""Decoding: one loop for every decoder of the project.

  loop.py      the `lax.while_loop` over positions (`decode`), its named carry (`DecodeState`)
               and the per-token hook interface (`TokenHook`)
  hooks.py     the plain hooks: sampling (`SamplingHook`, the rollout's) and greedy (`GreedyHook`)
  sampling.py  the token choice from logits: temperature, top-k, top-p, per-row keys
  sampler.py   the entry point for the MLLM: host preparation, prefill, cache layout, `generate`

The other hooks live with their methods: rl/proxy_sampler.py (Proxy-RLHF's accept/reject),
fastmem.py (FastMem's contrastive decoding); models/smollm2.py runs the loop on a text LM.
"""
