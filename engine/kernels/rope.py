"""Wan's 3D rotary embedding applied to q or k, forward and backward in Triton.

x is [B, S, N, Dh]; adjacent pairs (x[2i], x[2i+1]) of every head rotate by the token's angle for pair i:

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

cos/sin are [S, Dh/2] (or [S, 1, Dh/2]) fp32 tables, one row per token of *this* x, so a sequence-parallel rank
passes the rows of its own slice (engine.model.dit.Rope.slice). Wan's frequency layout (frame / height / width parts of
the head dim) lives in the tables (engine.model.dit.rope_for_grid). The backward rotates by the opposite angle, so
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
def _rotate(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, heads, half, direction, HEAD_TILE: tl.constexpr,
            PAIRS: tl.constexpr):
    """One (sample, token) row, HEAD_TILE of its heads: the heads' values are read and written as one contiguous
    [HEAD_TILE, 2 * PAIRS] tile (vector accesses), split into the pairs' two halves in registers."""
    row = tl.program_id(0).to(tl.int64)
    token = row % seq_len
    h = tl.program_id(1) * HEAD_TILE + tl.arange(0, HEAD_TILE)
    e = tl.arange(0, 2 * PAIRS)
    offsets = h[:, None] * (2 * half) + e[None, :]
    mask = (h[:, None] < heads) & (e[None, :] < 2 * half)
    first = row * heads * 2 * half
    x = tl.load(x_ptr + first + offsets, mask=mask, other=0.0).to(tl.float32)
    a, b = tl.split(tl.reshape(x, [HEAD_TILE, PAIRS, 2]))
    pair = tl.arange(0, PAIRS)
    c = tl.load(cos_ptr + token * half + pair, mask=pair < half, other=0.0)[None, :]
    s = tl.load(sin_ptr + token * half + pair, mask=pair < half, other=0.0)[None, :] * direction
    out = tl.reshape(tl.join(a * c - b * s, a * s + b * c), [HEAD_TILE, 2 * PAIRS])
    tl.store(out_ptr + first + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def head_tile(heads: int) -> int:
    """Heads per program: the largest power of two up to 8 that divides the head count (Wan 1.3B's 12: 4, 14B's
    40: 8), so no program holds masked-off heads."""
    return next(t for t in (8, 4, 2, 1) if heads % t == 0)


def launch_settings(heads: int, head_dim: int, element_size: int) -> tuple[int, int]:
    """(HEAD_TILE, num_warps): each thread moves 16 bytes of x, one vector access."""
    tile = head_tile(heads)
    threads = tile * triton.next_power_of_2(head_dim) * element_size // 16
    return tile, min(32, max(1, threads // 32))


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, direction: float) -> torch.Tensor:
    batch, seq_len, heads, head_dim = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    tile, warps = launch_settings(heads, head_dim, x.element_size())
    _rotate[(batch * seq_len, triton.cdiv(heads, tile))](x, cos, sin, out, seq_len, heads, head_dim // 2, direction,
                                                          HEAD_TILE=tile, PAIRS=triton.next_power_of_2(head_dim // 2),
                                                          num_warps=warps)
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
