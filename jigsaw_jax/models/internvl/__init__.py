"""InternVL (transformers' native InternVLForConditionalGeneration) as a policy.

config.py (the vision side's shape), vision.py (InternViT, pixel shuffle, projector),
processing.py (448-pixel tiling with a thumbnail, <img> prompts), hf_io.py (name map, configs).
The language model is our Qwen2 decoder with 1-D RoPE; `mllm.VisionLanguageModel` puts the two
together when `cfg.vision.kind == "internvl"`.
"""
