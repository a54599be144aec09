"""Modulated LayerNorm (adaLN), forward and backward in Triton:

    y = LN(x) * (1 + scale) + shift          LayerNorm without affine, fp32 statistics, y in x's dtype

x is [..., N] viewed as rows; shift and scale are [G, N], one vector per group of `rows // G` consecutive rows (a
sample's tokens, or a frame's for models that modulate per frame). Forward saves x and two fp32 numbers a row
(mean, 1/std). Backward, with x_hat = (x - mean) * rstd and g = dy * (1 + scale):
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dscale = sum_group dy * x_hat,  dshift = sum_group dy
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def modulated_layer_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                   eps: float) -> torch.Tensor:
    """Plain PyTorch; shift/scale broadcast against x (e.g. [B, 1, N] against [B, S, N])."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


@triton.jit
def _normalize_and_store(x, row, group, cols, mask, n_cols, eps, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr):
    """Shared by both forward kernels: row statistics of the fp32 row x, then the modulated output."""
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    shift = tl.load(shift_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n_cols + cols, (centred * rstd * (1 + scale) + shift).to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _norm_grad(x, dy, mean, rstd, scale, mask, n_cols):
    """Shared by both backward kernels: (x_hat, gradient through the modulated LayerNorm) of one row."""
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * (1 + scale)
    return x_hat, rstd * (g - tl.sum(g, axis=0) / n_cols - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))


@triton.jit
def _forward(x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, rows_per_group, eps,
             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    _normalize_and_store(x, row, row // rows_per_group, cols, mask, n_cols, eps, shift_ptr, scale_ptr, y_ptr,
                         mean_ptr, rstd_ptr)


@triton.jit
def _backward(dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_ptr, dscale_ptr, n_cols,
              rows_per_group, rows_per_program, programs_per_group, BLOCK: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(scale_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK], dtype=tl.float32)
    dscale = tl.zeros([BLOCK], dtype=tl.float32)
    first = chunk * rows_per_program
    for i in range(rows_per_program):
        within = first + i
        if within < rows_per_group:
            row = (group * rows_per_group + within).to(tl.int64)
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat, dx = _norm_grad(x, dy, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), scale, mask, n_cols)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dshift += dy
            dscale += dy * x_hat
    out = (group * programs_per_group + chunk) * n_cols + cols
    tl.store(dshift_ptr + out, dshift, mask=mask)
    tl.store(dscale_ptr + out, dscale, mask=mask)


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
        _forward[(rows,)](x2, shift.contiguous(), scale.contiguous(), y, mean, rstd, cols, rows // groups, eps,
                          BLOCK=triton.next_power_of_2(cols))
        ctx.save_for_backward(x2, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, scale, mean, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        groups = scale.shape[0]
        rows_per_group = rows // groups
        programs_per_group = max(1, min(rows_per_group, 64))
        rows_per_program = triton.cdiv(rows_per_group, programs_per_group)
        dx = torch.empty_like(x2)
        partial = torch.empty(2, groups * programs_per_group, cols, dtype=torch.float32, device=x2.device)
        _backward[(groups, programs_per_group)](
            dy.reshape(rows, cols).contiguous(), x2, scale.contiguous(), mean, rstd, dx, partial[0], partial[1], cols,
            rows_per_group, rows_per_program, programs_per_group, BLOCK=triton.next_power_of_2(cols))
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
# One read of x and y writes both x' and h. Backward takes the gradients of both outputs.


def residual_modulated_layer_norm_reference(x, y, gate, shift, scale, eps):
    """Plain PyTorch; gate/shift/scale broadcast against x; gate None means 1. Returns (x', h) in x's dtype."""
    x_new = x.float() + y.float() * (1 if gate is None else gate.float())
    return x_new.to(x.dtype), modulated_layer_norm_reference(x_new, shift, scale, eps).to(x.dtype)


@triton.jit
def _residual_forward(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, x_out_ptr, h_ptr, mean_ptr, rstd_ptr, n_cols,
                      rows_per_group, eps, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_group
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        y = y * tl.load(gate_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32) + y
    tl.store(x_out_ptr + row * n_cols + cols, x.to(x_out_ptr.dtype.element_ty), mask=mask)
    _normalize_and_store(x, row, group, cols, mask, n_cols, eps, shift_ptr, scale_ptr, h_ptr, mean_ptr, rstd_ptr)


@triton.jit
def _residual_backward(dx_out_ptr, dh_ptr, x_out_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr,
                       partial_ptr, n_cols, rows_per_group, rows_per_program, programs_per_group, partial_stride,
                       HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(scale_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + group * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        gate = tl.full([BLOCK], 1.0, tl.float32)
    dshift = tl.zeros([BLOCK], dtype=tl.float32)
    dscale = tl.zeros([BLOCK], dtype=tl.float32)
    dgate = tl.zeros([BLOCK], dtype=tl.float32)
    first = chunk * rows_per_program
    for i in range(rows_per_program):
        within = first + i
        if within < rows_per_group:
            row = (group * rows_per_group + within).to(tl.int64)
            offs = row * n_cols + cols
            x = tl.load(x_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_hat, d_norm = _norm_grad(x, dh, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), scale, mask, n_cols)
            dx = tl.load(dx_out_ptr + offs, mask=mask, other=0.0).to(tl.float32) + d_norm
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dy_ptr + offs, (dx * gate).to(dy_ptr.dtype.element_ty), mask=mask)
            dshift += dh
            dscale += dh * x_hat
            dgate += dx * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (group * programs_per_group + chunk) * n_cols + cols
    tl.store(partial_ptr + out, dshift, mask=mask)
    tl.store(partial_ptr + partial_stride + out, dscale, mask=mask)
    tl.store(partial_ptr + 2 * partial_stride + out, dgate, mask=mask)


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
        _residual_forward[(rows,)](x2, y2, gate_arg, shift.contiguous(), scale.contiguous(), x_out, h, mean, rstd,
                                   cols, rows // groups, eps, HAS_GATE=has_gate, BLOCK=triton.next_power_of_2(cols))
        ctx.save_for_backward(x_out, y2, gate_arg, scale, mean, rstd)
        ctx.has_gate, ctx.dtypes, ctx.shapes = has_gate, (y.dtype, shift.dtype), (x.shape, y.shape)
        return x_out.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dx_out, dh):
        x_out, y2, gate, scale, mean, rstd = ctx.saved_tensors
        rows, cols = x_out.shape
        groups = scale.shape[0]
        rows_per_group = rows // groups
        programs_per_group = max(1, min(rows_per_group, 64))
        dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.reshape(rows, cols).contiguous()
        dh = torch.zeros_like(x_out) if dh is None else dh.reshape(rows, cols).contiguous()
        dx, dy = torch.empty_like(x_out), torch.empty_like(y2)
        partial = torch.empty(3, groups * programs_per_group, cols, dtype=torch.float32, device=x_out.device)
        _residual_backward[(groups, programs_per_group)](
            dx_out, dh, x_out, y2, gate, scale.contiguous(), mean, rstd, dx, dy, partial, cols, rows_per_group,
            triton.cdiv(rows_per_group, programs_per_group), programs_per_group, partial[0].numel(),
            HAS_GATE=ctx.has_gate, BLOCK=triton.next_power_of_2(cols))
        dshift, dscale, dgate = partial.view(3, groups, programs_per_group, cols).sum(2)
        return (dx.view(ctx.shapes[0]), dy.view(ctx.shapes[1]), dgate.to(ctx.dtypes[1]) if ctx.has_gate else None, dshift.to(ctx.dtypes[1]),
                dscale.to(scale.dtype), None)


def residual_modulated_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `x' = x + gate * y; h = LN(x') * (1 + scale) + shift` for x, y [B, S, N] and gate/shift/scale
    [B, 1, N] or [B, F, N] (gate may be None). Returns (x', h), both in x's dtype."""
    batch, tokens, cols = x.shape
    groups = batch * shift.shape[1]
    flat = (lambda t: None if t is None else t.reshape(groups, cols))
    x_out, h = ResidualModulatedLayerNormFunction.apply(x, y, flat(gate), flat(shift), flat(scale), eps)
    return x_out.view(x.shape), h.view(x.shape)
