"""The Triton kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90) on this CPU machine, at the launch
settings their launch code picks for Wan's shapes (benchmarks/kernel_compile.py): none may spill a register, exceed
shared memory or leave SMs idle for one sample."""

import json
import os
import subprocess
import sys

from conftest import ROOT

WIDTHS, DTYPES, ARCHS = {1536, 5120}, {"fp32", "bf16"}, {80, 90}
KERNELS = {"rms_norm._forward", "rms_norm._backward", "modulated_layer_norm._forward", "modulated_layer_norm._backward",
           "modulated_layer_norm._residual_forward", "modulated_layer_norm._residual_backward", "rope._rotate"}


def compiler_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills_at_wans_widths(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_compile", "--check", "--out", str(tmp_path)],
                          cwd=ROOT, env=compiler_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_compile.json").read_text())
    rows = report["rows"]
    assert report["problems"] == []
    covered = {(r["kernel"], r["width"], r["dtype"], r["arch"]) for r in rows}
    assert covered == {(k, w, d, a) for k in KERNELS for w in WIDTHS for d in DTYPES for a in ARCHS}
    for r in rows:
        assert "error" not in r and r["spill_bytes"] == 0, r
        assert r["programs"] >= {80: 108, 90: 132}[r["arch"]], r  # one sample fills the GPU
    # the residual kernel's gradient reads y only with a gate: fewer bytes without one
    residual = {r["op"]: r["bytes_per_token"] for r in rows
                if r["kernel"] == "modulated_layer_norm._residual_backward" and r["width"] == 5120
                and r["dtype"] == "bf16"}
    assert residual["residual_modulated_layer_norm"] == residual["residual_modulated_layer_norm (gated)"] - 2 * 5120


def test_the_check_reports_a_spill_it_is_shown():
    """At 4 warps, the 14B-width residual backward holds 40 values a thread per row tile: the compiler must spill,
    and the check must say so."""
    script = """
from benchmarks.kernel_compile import check, compile_launch, describe, record_launches
launch = next(l for l in record_launches(132) if l.kernel.endswith("_residual_backward") and l.width == 5120)
launch.kwargs["num_warps"] = 4
problems = check([describe(launch, 90, compile_launch(launch, 90))])
assert len(problems) == 1 and "spills" in problems[0] and "at 4 warps" in problems[0], problems
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=compiler_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
