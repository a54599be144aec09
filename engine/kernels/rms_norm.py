"""RMSNorm over the last dim with a weight (Wan's q/k norm over the full model dim), forward and backward in Triton.

    y = x / sqrt(mean(x^2) + eps) * w          statistics and arithmetic in fp32, y in x's dtype

Forward saves only x and the per-row 1/rms (4 bytes a row), not the normalised activations. Backward:
    x_hat = x * rstd,  g = dy * w
    dx = rstd * (g - x_hat * mean(g * x_hat)),   dw = sum over rows of dy * x_hat
dw is reduced per program into a [programs, N] fp32 buffer, then summed. Rows are tiled as engine/kernels/rows.py says.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.rows import load_row, num_warps, reduction_programs, row_sum, row_tiles, store_row


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain PyTorch definition the kernel is tested and benchmarked against."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# Per thread at most this many values of a row, forward and backward: no register spill at Wan's widths (sm_80,
# sm_90; benchmarks/kernel_compile.py).
FORWARD_PER_THREAD = 16
BACKWARD_PER_THREAD = 10


@triton.jit
def _forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    xa, xb = load_row(x_ptr + row * n_cols, head, tail, n_cols)
    wa, wb = load_row(w_ptr, head, tail, n_cols)
    rstd = 1.0 / tl.sqrt(row_sum(xa * xa, xb * xb) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    store_row(y_ptr + row * n_cols, head, tail, n_cols, xa * rstd * wa, xb * rstd * wb)


@triton.jit
def _backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
              HEAD: tl.constexpr, TAIL: tl.constexpr):
    program = tl.program_id(0)
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    dwa = tl.zeros([HEAD], dtype=tl.float32)
    dwb = tl.zeros([TAIL], dtype=tl.float32)
    for i in range(rows_per_program):
        row = (program * rows_per_program + i).to(tl.int64)
        if row < n_rows:
            xa, xb = load_row(x_ptr + row * n_cols, head, tail, n_cols)
            dya, dyb = load_row(dy_ptr + row * n_cols, head, tail, n_cols)
            wa, wb = load_row(w_ptr, head, tail, n_cols)  # re-read (cached) rather than held across the loop
            rstd = tl.load(rstd_ptr + row)
            xha, xhb = xa * rstd, xb * rstd
            ga, gb = dya * wa, dyb * wb
            c = row_sum(ga * xha, gb * xhb) / n_cols
            store_row(dx_ptr + row * n_cols, head, tail, n_cols, rstd * (ga - xha * c), rstd * (gb - xhb * c))
            dwa += dya * xha
            dwb += dyb * xhb
    store_row(dw_ptr + program * n_cols, head, tail, n_cols, dwa, dwb)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        head, tail = row_tiles(cols)
        _forward[(rows,)](x2, weight.contiguous(), y, rstd, cols, eps, HEAD=head, TAIL=tail,
                          num_warps=num_warps(cols, FORWARD_PER_THREAD))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        programs = reduction_programs(rows, 1, x2.device)
        partial_dw = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        head, tail = row_tiles(cols)
        _backward[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, partial_dw, rows, cols,
                               triton.cdiv(rows, programs), HEAD=head, TAIL=tail,
                               num_warps=num_warps(cols, BACKWARD_PER_THREAD))
        return dx.view(dy.shape), partial_dw.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm of x [..., N] with weight [N]; output in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)
