"""Wan's 3D rotary embedding applied to q or k, forward and backward in Triton.

x is [B, S, N, Dh]; adjacent pairs (x[2i], x[2i+1]) of every head rotate by the token's angle for pair i:

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

cos/sin are [S, Dh/2] (or [S, 1, Dh/2]) fp32 tables, one row per token of *this* x, so a sequence-parallel rank
passes the rows of its own slice (engine.dit.Rope.slice). Wan's frequency layout (frame / height / width parts of
the head dim) lives in the tables (engine.dit.rope_for_grid). The backward rotates by the opposite angle, so
nothing but the tables is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, in fp32, result in x's dtype; cos/sin [S, Dh/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos.view(cos.shape[0], 1, -1), sin.view(sin.shape[0], 1, -1)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(x.dtype)


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, heads, half, direction, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (sample, token)
    token = row % seq_len
    k = tl.arange(0, BLOCK)
    mask = k < heads * half
    head, pair = k // half, k % half
    even = row * heads * 2 * half + head * 2 * half + 2 * pair
    a = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + token * half + pair, mask=mask, other=0.0)
    s = tl.load(sin_ptr + token * half + pair, mask=mask, other=0.0) * direction
    tl.store(out_ptr + even, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + even + 1, (a * s + b * c).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, direction: float) -> torch.Tensor:
    batch, seq_len, heads, head_dim = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    half = head_dim // 2
    _rotate[(batch * seq_len,)](x, cos, sin, out, seq_len, heads, half, direction,
                                BLOCK=triton.next_power_of_2(heads * half))
    return out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, N, Dh] by per-token tables cos/sin [S, Dh/2] or [S, 1, Dh/2]; result in x's dtype."""
    seq_len, head_dim = x.shape[1], x.shape[-1]
    cos = cos.reshape(seq_len, head_dim // 2).float().contiguous()
    sin = sin.reshape(seq_len, head_dim // 2).float().contiguous()
    return RopeFunction.apply(x, cos, sin)
