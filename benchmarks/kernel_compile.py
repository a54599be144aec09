"""Every Triton kernel compiled ahead of time for real GPUs, on a machine without one: registers, spills, shared
memory and grid size at the launch settings the kernels' own launch code picks, with the bytes each moves per token.

    python -m benchmarks.kernel_compile            # writes benchmarks/results/kernel_compile.json and .md
    python -m benchmarks.kernel_compile --check    # the same; exit status 1 if a kernel spills, exceeds shared
                                                   # memory or leaves SMs idle for one sample (the test suite's check)

The launch code of each op (engine/kernels/*.py) runs forward and backward on meta tensors of Wan's real shapes (1.3B: width
1536, 12 heads; 14B: 5120, 40 heads; head dim 128; 480P and 720P x 81 frames: 32,760 and 75,600 tokens; fp32 and
bf16), with its kernels' launches recorded instead of run. Each recorded launch is then compiled by Triton's own JIT
path (`JITFunction.run(warmup=True)`, so with the specialisations a real launch gets) for sm_80 (A100) and sm_90
(H100), and `cuobjdump --dump-resource-usage` reads registers, stack (spills) and shared memory from the cubin.

Bytes per token are what each kernel must read and write (benchmarks/kernel_speed.py's traffic model); "target" is
the fraction of copy bandwidth a kernel of its kind should reach (PERF_NOTES: Liger's RMSNorm forward 84% of H100
HBM, backward kernels 40-80%), and the time it then takes for one 720P sample on an H100 SXM (3.35 TB/s) is modelled,
not measured; `python -m benchmarks.gpu_check` measures it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled
    os.environ.pop("TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

import engine.kernels.rows  # noqa: E402
from benchmarks.kernel_launches import recorded_launches  # noqa: E402
from benchmarks.kernel_speed import H100_BANDWIDTH, TARGET_FRACTION, TOKENS, WIDTHS, traffic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 128
# compute capability -> (GPU, SMs, shared memory a block may use in bytes: 163 KB on A100, 227 KB on H100)
ARCHS = {80: ("A100", 108, 166_912), 90: ("H100 SXM", 132, 232_448)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Launch:
    """One kernel launch as the launch code made it; tensor arguments are kept as their dtypes."""

    op: str
    phase: str  # forward or backward
    kernel: str
    width: int
    dtype: str
    tokens: int
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= size
        return total

    def key(self) -> tuple:
        """What Triton specialises a compiled kernel on: argument types, integers' divisibility, constexprs."""
        spec = tuple(str(a) if isinstance(a, torch.dtype) else
                     (type(a).__name__, a % 16 == 0, a == 1) if isinstance(a, int) else type(a).__name__
                     for a in self.args)
        return self.op, self.phase, self.kernel, spec, tuple(sorted(self.kwargs.items()))


def _leaf(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)


def ops(width: int, dtype: torch.dtype, tokens: int) -> dict:
    """Each op as the DiT calls it (and the gated residual the kernel also offers): forward and backward on meta
    tensors of one sample."""
    from engine.kernels.modulated_layer_norm import modulated_layer_norm, residual_modulated_layer_norm
    from engine.kernels.rms_norm import rms_norm
    from engine.kernels.rope import apply_rope

    heads = width // HEAD_DIM
    modulation = [_leaf(1, 1, width, dtype=torch.float32) for _ in range(3)]
    return {
        "rms_norm": lambda: rms_norm(_leaf(1, tokens, width, dtype=dtype), _leaf(width, dtype=dtype), 1e-6),
        "modulated_layer_norm": lambda: modulated_layer_norm(_leaf(1, tokens, width, dtype=dtype), *modulation[:2],
                                                             1e-6),
        "residual_modulated_layer_norm": lambda: torch.cat(residual_modulated_layer_norm(
            _leaf(1, tokens, width, dtype=torch.float32), _leaf(1, tokens, width, dtype=dtype), None,
            *modulation[:2], 1e-6), dim=-1),
        "residual_modulated_layer_norm (gated)": lambda: torch.cat(residual_modulated_layer_norm(
            _leaf(1, tokens, width, dtype=torch.float32), _leaf(1, tokens, width, dtype=dtype), *modulation, 1e-6),
            dim=-1),
        "rope": lambda: apply_rope(_leaf(1, tokens, heads, HEAD_DIM, dtype=dtype),
                                   torch.empty(tokens, HEAD_DIM // 2, device="meta"),
                                   torch.empty(tokens, HEAD_DIM // 2, device="meta")),
    }


def record_launches(multiprocessors: int) -> list[Launch]:
    """Every launch of every op at every (width, dtype, token count), on a device of `multiprocessors` SMs."""
    launches: list[Launch] = []
    saved = engine.kernels.rows.DEFAULT_MULTIPROCESSORS
    engine.kernels.rows.DEFAULT_MULTIPROCESSORS = multiprocessors
    try:
        for width in WIDTHS.values():
            for dtype_name, dtype in DTYPES.items():
                for tokens in TOKENS.values():
                    for op, run in ops(width, dtype, tokens).items():
                        case = dict(op=op, width=width, dtype=dtype_name, tokens=tokens)

                        def record(name, grid, args, kwargs, phase):
                            launches.append(Launch(kernel=name, grid=grid, args=args, kwargs=kwargs, phase=phase,
                                                   **case))
                        with recorded_launches(lambda *launch: record(*launch, "forward")):
                            out = run()
                        with recorded_launches(lambda *launch: record(*launch, "backward")):
                            out.backward(torch.empty_like(out))
    finally:
        engine.kernels.rows.DEFAULT_MULTIPROCESSORS = saved
    return launches


class _AheadOfTime(DriverBase):
    """A driver for Triton's JIT that targets a GPU which is not there: it compiles, it cannot launch."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("ahead-of-time compilation only")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("ahead-of-time compilation only")

    def get_current_device(self) -> int:
        return self.arch  # one JIT cache per target

    def get_current_stream(self, device=None) -> int:
        return 0


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack and local memory per thread (spills), shared memory per block, from the cubin."""
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "spill_bytes": stack + local, "shared_bytes": shared}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one recorded launch for `arch` through Triton's JIT; its resource usage, or the compile error. The
    process's Triton driver is left targeting `arch` (this tool's processes only compile)."""
    module_name, name = launch.kernel.rsplit(".", 1)
    kernel = getattr(sys.modules[module_name], name)
    driver.set_active(_AheadOfTime(arch))
    try:
        args = [MockTensor.wrap_dtype(a) for a in launch.args]
        compiled = kernel.run(*args, grid=launch.grid, warmup=True, **launch.kwargs)
        return {**resources(compiled.asm["cubin"]), "num_warps": compiled.metadata.num_warps}
    except Exception as e:  # a compile error is a finding to report, not a crash of the report
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _compile_job(job: tuple[Launch, int]) -> dict:
    return compile_launch(*job)


def check(rows: list[dict]) -> list[str]:
    """What the suite refuses: compile errors, spills, shared memory above the target's limit, a grid with fewer
    programs than SMs for one sample."""
    problems = []
    for r in rows:
        where = f"{r['kernel']} ({r['op']}, width {r['width']}, {r['dtype']}, {r['tokens']} tokens, sm_{r['arch']})"
        if "error" in r:
            problems.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["spill_bytes"]:
            problems.append(f"{where}: spills {r['spill_bytes']} bytes a thread at {r['num_warps']} warps")
        if r["shared_bytes"] > ARCHS[r["arch"]][2]:
            problems.append(f"{where}: {r['shared_bytes']} bytes of shared memory, above {ARCHS[r['arch']][2]}")
        if r["programs"] < ARCHS[r["arch"]][1]:
            problems.append(f"{where}: {r['programs']} programs for {ARCHS[r['arch']][1]} SMs")
    return problems


def measure(workers: int) -> list[dict]:
    """One row per (arch, recorded launch): its settings, grid, resources (one compile per distinct
    specialisation) and traffic."""
    launches = [(launch, arch) for arch, (_, sms, _) in ARCHS.items() for launch in record_launches(sms)]
    distinct = {}
    for launch, arch in launches:
        distinct.setdefault((arch, launch.key()), (launch, arch))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        compiled = dict(zip(distinct, pool.map(_compile_job, distinct.values())))
    return [describe(launch, arch, compiled[(arch, launch.key())]) for launch, arch in launches]


def describe(launch: Launch, arch: int, compiled: dict) -> dict:
    """A report row: the launch's settings and grid, its compiled resources and its traffic."""
    bytes_per_token = traffic(launch.op, launch.phase, launch.width, DTYPES[launch.dtype])
    seconds_720p = bytes_per_token * TOKENS["720p"] / (TARGET_FRACTION[launch.phase] * H100_BANDWIDTH)
    return {"op": launch.op, "kernel": launch.kernel.removeprefix("engine.kernels."), "phase": launch.phase,
            "width": launch.width, "dtype": launch.dtype, "tokens": launch.tokens, "arch": arch,
            "grid": list(launch.grid), "programs": launch.programs,
            "constexprs": {k: v for k, v in launch.kwargs.items() if k != "num_warps"},
            "bytes_per_token": bytes_per_token, "target_fraction_of_copy": TARGET_FRACTION[launch.phase],
            "modelled_ms_per_720p_sample_h100": 1e3 * seconds_720p, **compiled}


def write_report(rows: list[dict], problems: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "kernel_compile"
    report = {"device": "ahead of time for sm_80 (A100) and sm_90 (H100); no GPU", "triton": triton.__version__,
              "torch": torch.__version__, "archs": {str(a): {"gpu": g, "sms": s, "shared_limit_bytes": m}
                                                     for a, (g, s, m) in ARCHS.items()},
              "h100_bandwidth_bytes_per_s": H100_BANDWIDTH, "problems": problems, "rows": rows}
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Triton kernels compiled ahead of time (Triton {triton.__version__}, no GPU)", "",
             "Registers per thread, spills (stack + local bytes per thread) and shared memory per block from "
             "`cuobjdump --dump-resource-usage`, at the warps and grid the launch code picks for one sample "
             "(A100: 108 SMs, H100: 132). Bytes per token: what the kernel must read and write; the last column "
             "is modelled: those bytes for a 720P sample (75,600 tokens) at the target fraction of an H100 SXM's "
             "3.35 TB/s. Regenerate: `python -m benchmarks.kernel_compile`.", "",
             f"Problems: {'none' if not problems else len(problems)}", *[f"- {p}" for p in problems], "",
             "| kernel | op | width | dtype | tokens | sm | warps | programs | registers | spills (B) | shared (B) "
             "| bytes/token | target | modelled ms (720P, H100) |", "|---|---|---|---|---|---|" + "---|" * 8]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["op"], r["width"], r["dtype"], r["tokens"], r["arch"])):
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['op']} | {r['width']} | {r['dtype']} | {r['tokens']} | {r['arch']} "
                         f"| error: {r['error']} |" + " |" * 7)
            continue
        lines.append(f"| {r['kernel']} | {r['op']} | {r['width']} | {r['dtype']} | {r['tokens']} | {r['arch']} | "
                     f"{r['num_warps']} | {r['programs']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes']} | {r['bytes_per_token']:,} | {r['target_fraction_of_copy']:.0%} | "
                     f"{r['modelled_ms_per_720p_sample_h100']:.3f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit with status 1 on any problem")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results", help="report folder")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    args = parser.parse_args(argv)
    rows = measure(args.workers)
    problems = check(rows)
    stem = write_report(rows, problems, args.out)
    print(f"wrote {stem}.json and .md: {len(rows)} launches, {len(problems)} problems")
    for problem in problems:
        print(f"  {problem}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
