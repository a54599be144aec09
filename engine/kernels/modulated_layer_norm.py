"""Modulated LayerNorm (adaLN), forward and backward in Triton:

    y = LN(x) * (1 + scale) + shift          LayerNorm without affine, fp32 statistics, y in x's dtype

x is [..., N] viewed as rows; shift and scale are [G, N], one vector per group of `rows // G` consecutive rows (a
sample's tokens, or a frame's for models that modulate per frame). Forward saves x and two fp32 numbers a row
(mean, 1/std). Backward, with x_hat = (x - mean) * rstd and g = dy * (1 + scale):
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dscale = sum_group dy * x_hat,  dshift = sum_group dy
Rows are tiled as engine/kernels/rows.py says; the column sums are reduced per program into fp32 partials, then summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.rows import load_row, num_warps, reduction_programs, row_sum, row_tiles, store_row


def modulated_layer_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                   eps: float) -> torch.Tensor:
    """Plain PyTorch; shift/scale broadcast against x (e.g. [B, 1, N] against [B, S, N])."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


# Per thread at most this many values of a row: no register spill at Wan's widths (sm_80, sm_90;
# benchmarks/kernel_compile.py). The backward kernels carry two or three column sums across their rows.
FORWARD_PER_THREAD = 16
BACKWARD_PER_THREAD = 8


@triton.jit
def _normalize_and_store(xa, xb, row, group, head, tail, n_cols, eps, shift_ptr, scale_ptr, y_ptr, mean_ptr,
                         rstd_ptr):
    """Shared by both forward kernels: row statistics of the fp32 row (xa, xb), then the modulated output."""
    mean = row_sum(xa, xb) / n_cols
    ca, cb = xa - mean, tl.where(tail < n_cols, xb - mean, 0.0)
    rstd = 1.0 / tl.sqrt(row_sum(ca * ca, cb * cb) / n_cols + eps)
    shift_a, shift_b = load_row(shift_ptr + group * n_cols, head, tail, n_cols)
    scale_a, scale_b = load_row(scale_ptr + group * n_cols, head, tail, n_cols)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    store_row(y_ptr + row * n_cols, head, tail, n_cols, ca * rstd * (1 + scale_a) + shift_a,
              cb * rstd * (1 + scale_b) + shift_b)


@triton.jit
def _norm_grad(xa, xb, dya, dyb, mean, rstd, scale_a, scale_b, tail, n_cols):
    """Shared by both backward kernels: x_hat and the gradient through the modulated LayerNorm, per tile."""
    xha, xhb = (xa - mean) * rstd, tl.where(tail < n_cols, (xb - mean) * rstd, 0.0)
    ga, gb = dya * (1 + scale_a), dyb * (1 + scale_b)
    c1, c2 = row_sum(ga, gb) / n_cols, row_sum(ga * xha, gb * xhb) / n_cols
    return xha, xhb, rstd * (ga - c1 - xha * c2), rstd * (gb - c1 - xhb * c2)


@triton.jit
def _forward(x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, rows_per_group, eps,
             HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    xa, xb = load_row(x_ptr + row * n_cols, head, tail, n_cols)
    _normalize_and_store(xa, xb, row, row // rows_per_group, head, tail, n_cols, eps, shift_ptr, scale_ptr, y_ptr,
                         mean_ptr, rstd_ptr)


@triton.jit
def _backward(dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_ptr, dscale_ptr, n_cols,
              rows_per_group, rows_per_program, programs_per_group, HEAD: tl.constexpr, TAIL: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    dshift_a, dshift_b = tl.zeros([HEAD], dtype=tl.float32), tl.zeros([TAIL], dtype=tl.float32)
    dscale_a, dscale_b = tl.zeros([HEAD], dtype=tl.float32), tl.zeros([TAIL], dtype=tl.float32)
    first = chunk * rows_per_program
    for i in range(rows_per_program):
        within = first + i
        if within < rows_per_group:
            row = (group * rows_per_group + within).to(tl.int64)
            xa, xb = load_row(x_ptr + row * n_cols, head, tail, n_cols)
            dya, dyb = load_row(dy_ptr + row * n_cols, head, tail, n_cols)
            # re-read (cached) rather than held across the loop, which would spill
            scale_a, scale_b = load_row(scale_ptr + group * n_cols, head, tail, n_cols)
            xha, xhb, dxa, dxb = _norm_grad(xa, xb, dya, dyb, tl.load(mean_ptr + row), tl.load(rstd_ptr + row),
                                            scale_a, scale_b, tail, n_cols)
            store_row(dx_ptr + row * n_cols, head, tail, n_cols, dxa, dxb)
            dshift_a += dya
            dshift_b += dyb
            dscale_a += dya * xha
            dscale_b += dyb * xhb
    out = (group * programs_per_group + chunk) * n_cols
    store_row(dshift_ptr + out, head, tail, n_cols, dshift_a, dshift_b)
    store_row(dscale_ptr + out, head, tail, n_cols, dscale_a, dscale_b)


class ModulatedLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        cols = x.shape[-1]
        x2 = x.reshape(-1, cols).contiguous()
        rows, groups = x2.shape[0], shift.shape[0]
        if shift.shape != (groups, cols) or scale.shape != (groups, cols) or rows % groups:
            raise ValueError(f"shift/scale must be [G, {cols}] with G dividing {rows} rows; got "
                             f"{tuple(shift.shape)} and {tuple(scale.shape)}")
        y = torch.empty_like(x2)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        head, tail = row_tiles(cols)
        _forward[(rows,)](x2, shift.contiguous(), scale.contiguous(), y, mean, rstd, cols, rows // groups, eps,
                          HEAD=head, TAIL=tail, num_warps=num_warps(cols, FORWARD_PER_THREAD))
        ctx.save_for_backward(x2, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, scale, mean, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        groups = scale.shape[0]
        rows_per_group = rows // groups
        programs_per_group = reduction_programs(rows_per_group, groups, x2.device)
        dx = torch.empty_like(x2)
        partial = torch.empty(2, groups * programs_per_group, cols, dtype=torch.float32, device=x2.device)
        head, tail = row_tiles(cols)
        _backward[(groups, programs_per_group)](
            dy.reshape(rows, cols).contiguous(), x2, scale.contiguous(), mean, rstd, dx, partial[0], partial[1], cols,
            rows_per_group, triton.cdiv(rows_per_group, programs_per_group), programs_per_group, HEAD=head,
            TAIL=tail, num_warps=num_warps(cols, BACKWARD_PER_THREAD))
        dshift, dscale = partial.view(2, groups, programs_per_group, cols).sum(2)
        return dx.view(dy.shape), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused `LN(x) * (1 + scale) + shift` for x [B, S, N] with shift/scale [B, 1, N] (per sample) or [B, F, N]
    (per frame, S divisible by F): each modulation vector covers S / F consecutive tokens."""
    batch, tokens, cols = x.shape
    groups = batch * shift.shape[1]
    return ModulatedLayerNormFunction.apply(x, shift.reshape(groups, cols), scale.reshape(groups, cols), eps)


# ---------------------------------------------------------------------------------------------------------------
# Residual add fused with the modulated LayerNorm that follows it:
#     x' = x + gate * y          (fp32 residual stream; gate per group, or 1 when there is none)
#     h  = LN(x') * (1 + scale) + shift
# One read of x and y writes both x' and h. Backward takes the gradients of both outputs; it reads y (and the gate)
# only when there is a gate, for dgate.


def residual_modulated_layer_norm_reference(x, y, gate, shift, scale, eps):
    """Plain PyTorch; gate/shift/scale broadcast against x; gate None means 1. Returns (x', h) in x's dtype."""
    x_new = x.float() + y.float() * (1 if gate is None else gate.float())
    return x_new.to(x.dtype), modulated_layer_norm_reference(x_new, shift, scale, eps).to(x.dtype)


@triton.jit
def _residual_forward(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, x_out_ptr, h_ptr, mean_ptr, rstd_ptr, n_cols,
                      rows_per_group, eps, HAS_GATE: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_group
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    ya, yb = load_row(y_ptr + row * n_cols, head, tail, n_cols)
    if HAS_GATE:
        gate_a, gate_b = load_row(gate_ptr + group * n_cols, head, tail, n_cols)
        ya, yb = ya * gate_a, yb * gate_b
    xa, xb = load_row(x_ptr + row * n_cols, head, tail, n_cols)
    xa, xb = xa + ya, xb + yb
    store_row(x_out_ptr + row * n_cols, head, tail, n_cols, xa, xb)
    _normalize_and_store(xa, xb, row, group, head, tail, n_cols, eps, shift_ptr, scale_ptr, h_ptr, mean_ptr,
                         rstd_ptr)


@triton.jit
def _residual_backward(dx_out_ptr, dh_ptr, x_out_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr,
                       partial_ptr, n_cols, rows_per_group, rows_per_program, programs_per_group, partial_stride,
                       HAS_GATE: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    dshift_a, dshift_b = tl.zeros([HEAD], dtype=tl.float32), tl.zeros([TAIL], dtype=tl.float32)
    dscale_a, dscale_b = tl.zeros([HEAD], dtype=tl.float32), tl.zeros([TAIL], dtype=tl.float32)
    dgate_a, dgate_b = tl.zeros([HEAD], dtype=tl.float32), tl.zeros([TAIL], dtype=tl.float32)
    first = chunk * rows_per_program
    for i in range(rows_per_program):
        within = first + i
        if within < rows_per_group:
            row = (group * rows_per_group + within).to(tl.int64)
            xa, xb = load_row(x_out_ptr + row * n_cols, head, tail, n_cols)
            dha, dhb = load_row(dh_ptr + row * n_cols, head, tail, n_cols)
            scale_a, scale_b = load_row(scale_ptr + group * n_cols, head, tail, n_cols)
            xha, xhb, dna, dnb = _norm_grad(xa, xb, dha, dhb, tl.load(mean_ptr + row), tl.load(rstd_ptr + row),
                                            scale_a, scale_b, tail, n_cols)
            # accumulated first, so that dh and x_hat are dead before the gate and y arrive (else 32 warps spill)
            dshift_a += dha
            dshift_b += dhb
            dscale_a += dha * xha
            dscale_b += dhb * xhb
            dxa, dxb = load_row(dx_out_ptr + row * n_cols, head, tail, n_cols)
            dxa, dxb = dxa + dna, dxb + dnb
            store_row(dx_ptr + row * n_cols, head, tail, n_cols, dxa, dxb)
            if HAS_GATE:
                gate_a, gate_b = load_row(gate_ptr + group * n_cols, head, tail, n_cols)
                store_row(dy_ptr + row * n_cols, head, tail, n_cols, dxa * gate_a, dxb * gate_b)
                ya, yb = load_row(y_ptr + row * n_cols, head, tail, n_cols)
                dgate_a += dxa * ya
                dgate_b += dxb * yb
            else:
                store_row(dy_ptr + row * n_cols, head, tail, n_cols, dxa, dxb)
    out = (group * programs_per_group + chunk) * n_cols
    store_row(partial_ptr + out, head, tail, n_cols, dshift_a, dshift_b)
    store_row(partial_ptr + partial_stride + out, head, tail, n_cols, dscale_a, dscale_b)
    if HAS_GATE:
        store_row(partial_ptr + 2 * partial_stride + out, head, tail, n_cols, dgate_a, dgate_b)


class ResidualModulatedLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        cols = x.shape[-1]
        x2, y2 = x.reshape(-1, cols).contiguous(), y.reshape(-1, cols).contiguous()
        rows, groups = x2.shape[0], shift.shape[0]
        x_out, h = torch.empty_like(x2), torch.empty_like(x2)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        has_gate = gate is not None
        gate_arg = gate.contiguous() if has_gate else shift  # unread without a gate
        head, tail = row_tiles(cols)
        _residual_forward[(rows,)](x2, y2, gate_arg, shift.contiguous(), scale.contiguous(), x_out, h, mean, rstd,
                                   cols, rows // groups, eps, HAS_GATE=has_gate, HEAD=head, TAIL=tail,
                                   num_warps=num_warps(cols, FORWARD_PER_THREAD))
        # y and the gate enter the backward only through dgate and dy = gate * dx': without a gate, neither is kept
        ctx.save_for_backward(x_out, scale, mean, rstd, *((y2, gate_arg) if has_gate else ()))
        ctx.has_gate, ctx.dtypes, ctx.shapes = has_gate, (y.dtype, shift.dtype), (x.shape, y.shape)
        return x_out.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dx_out, dh):
        x_out, scale, mean, rstd, *gated = ctx.saved_tensors
        y2, gate = gated if ctx.has_gate else (scale, scale)  # unread without a gate
        rows, cols = x_out.shape
        groups = scale.shape[0]
        rows_per_group = rows // groups
        programs_per_group = reduction_programs(rows_per_group, groups, x_out.device)
        dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.reshape(rows, cols).contiguous()
        dh = torch.zeros_like(x_out) if dh is None else dh.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x_out)
        dy = torch.empty(rows, cols, dtype=ctx.dtypes[0], device=x_out.device)
        partial = torch.empty(3 if ctx.has_gate else 2, groups * programs_per_group, cols, dtype=torch.float32,
                              device=x_out.device)
        head, tail = row_tiles(cols)
        _residual_backward[(groups, programs_per_group)](
            dx_out, dh, x_out, y2, gate, scale.contiguous(), mean, rstd, dx, dy, partial, cols, rows_per_group,
            triton.cdiv(rows_per_group, programs_per_group), programs_per_group, partial[0].numel(),
            HAS_GATE=ctx.has_gate, HEAD=head, TAIL=tail, num_warps=num_warps(cols, BACKWARD_PER_THREAD))
        sums = partial.view(len(partial), groups, programs_per_group, cols).sum(2)
        dgate = sums[2].to(ctx.dtypes[1]) if ctx.has_gate else None
        return (dx.view(ctx.shapes[0]), dy.view(ctx.shapes[1]), dgate, sums[0].to(ctx.dtypes[1]),
                sums[1].to(scale.dtype), None)


def residual_modulated_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `x' = x + gate * y; h = LN(x') * (1 + scale) + shift` for x, y [B, S, N] and gate/shift/scale
    [B, 1, N] or [B, F, N] (gate may be None). Returns (x', h), both in x's dtype."""
    batch, tokens, cols = x.shape
    groups = batch * shift.shape[1]
    flat = (lambda t: None if t is None else t.reshape(groups, cols))
    x_out, h = ResidualModulatedLayerNormFunction.apply(x, y, flat(gate), flat(shift), flat(scale), eps)
    return x_out.view(x.shape), h.view(x.shape)
