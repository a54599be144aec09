"""The Triton kernels' launches recorded instead of run: for compiling them ahead of time for a GPU that is not there
(benchmarks/kernel_compile.py) and for tracing the memory of the fused-kernel path on fake tensors
(benchmarks/memory_model.py). The launch code around them runs for real: it allocates the outputs and saves what
backward needs, so shapes, grids and saved tensors are the real ones; only the kernels' writes are missing."""

from __future__ import annotations

import contextlib

import torch

import engine.kernels.modulated_layer_norm
import engine.kernels.rms_norm
import engine.kernels.rope

KERNELS = {  # module -> its jitted kernels, by the names its launch code calls them
    engine.kernels.rms_norm: ("_forward", "_backward"),
    engine.kernels.modulated_layer_norm: ("_forward", "_backward", "_residual_forward", "_residual_backward"),
    engine.kernels.rope: ("_rotate",),
}


class _Recorder:
    """Stands in for a jitted kernel: `kernel[grid](*args, **kwargs)` hands (kernel name, grid, args with tensors
    as their dtypes, kwargs) to `record` instead of launching."""

    def __init__(self, name: str, record) -> None:
        self.name, self.record = name, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record(self.name, tuple(grid), tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                        kwargs)
        return launch


@contextlib.contextmanager
def recorded_launches(record=lambda *launch: None):
    """Within: every kernel launch goes to `record(name, grid, args, kwargs)` (default: dropped) instead of a
    device; `name` is "module.kernel", e.g. "engine.kernels.rope._rotate"."""
    originals = {(m, n): getattr(m, n) for m, names in KERNELS.items() for n in names}
    for module, name in originals:
        setattr(module, name, _Recorder(f"{module.__name__}.{name}", record))
    try:
        yield
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
