"""Qwen3-VL (transformers' Qwen3VLForConditionalGeneration, dense sizes) on the shared skeleton.

The text side is the shared decoder with `TextConfig.qk_norm` and `mrope_interleaved`; this package
holds what is Qwen3-VL's own: the vision tower with its learned position embeddings and DeepStack
mergers (`vision`), and the HF checkpoint layout and config conversion (`hf`).
"""
