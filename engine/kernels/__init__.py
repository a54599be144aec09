"""Fused Triton kernels for the DiT, each beside its plain PyTorch reference; imports nothing else of the engine.

A subpackage of `engine`, not a top-level `kernels`: that name is Hugging Face's kernel hub, which transformers imports."""
