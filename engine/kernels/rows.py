"""Rows of a [rows, N] tensor as the norm kernels tile them, and the launch settings that go with the tiling.

A row is held as two power-of-two tiles, a head of HEAD = the largest power of two <= N columns and a tail of TAIL
columns covering the rest (masked), so Wan's widths carry no masked-off lanes (1536 = 1024 + 512, 5120 = 4096 +
1024) where one next-power-of-two tile would waste a quarter and three eighths of every register. Only the tail is
masked: the head is always inside the row.

Launch settings (warps, programs of a column reduction) are chosen here, per width, so that no kernel spills
registers at Wan's widths; `python -m benchmarks.kernel_compile` compiles every kernel with them for sm_80 and sm_90
and reports registers, spills and shared memory (the test suite fails on a spill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WARPS = (4, 8, 16, 32)  # a program has at least 4 and at most 32 warps (1024 threads)
DEFAULT_MULTIPROCESSORS = 132  # H100 SXM: sizes a reduction's grid where no CUDA device says otherwise
PROGRAMS_PER_MULTIPROCESSOR = 4  # column reductions: programs launched per SM (a few waves; partials stay small)


def row_tiles(n_cols: int) -> tuple[int, int]:
    """(HEAD, TAIL) of a row of n_cols; TAIL is 1 (and masked off) when HEAD covers the row."""
    if n_cols < 1:
        raise ValueError(f"a row needs at least one column, got {n_cols}")
    head = 1 << (n_cols.bit_length() - 1)
    return head, triton.next_power_of_2(n_cols - head) if n_cols > head else 1


def num_warps(elements: int, per_thread: int) -> int:
    """The fewest warps (4..32) that hold `elements` values of a program with at most `per_thread` per thread."""
    return next((w for w in WARPS if elements <= 32 * w * per_thread), WARPS[-1])


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the device a kernel runs on (CUDA), else DEFAULT_MULTIPROCESSORS."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_MULTIPROCESSORS


def reduction_programs(rows_per_group: int, groups: int, device: torch.device) -> int:
    """Programs per group of a backward that reduces over rows (dweight, dshift, dscale): about
    PROGRAMS_PER_MULTIPROCESSOR per SM in all, so one group (one sample) fills the device, and at most one per
    row."""
    wanted = PROGRAMS_PER_MULTIPROCESSOR * multiprocessors(device)
    return max(1, min(rows_per_group, -(-wanted // groups)))


@triton.jit
def load_row(ptr, head, tail, n_cols):
    """(head, tail) tiles of the row at ptr, in fp32; masked tail columns read 0."""
    return (tl.load(ptr + head).to(tl.float32),
            tl.load(ptr + tail, mask=tail < n_cols, other=0.0).to(tl.float32))


@triton.jit
def store_row(ptr, head, tail, n_cols, head_values, tail_values):
    """Write a row's (head, tail) tiles at ptr in ptr's dtype."""
    tl.store(ptr + head, head_values.to(ptr.dtype.element_ty))
    tl.store(ptr + tail, tail_values.to(ptr.dtype.element_ty), mask=tail < n_cols)


@triton.jit
def row_sum(head_values, tail_values):
    return tl.sum(head_values, axis=0) + tl.sum(tail_values, axis=0)
