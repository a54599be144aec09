"""Fused Triton kernels for the DiT, each beside its plain PyTorch reference; imports nothing from `engine`."""
