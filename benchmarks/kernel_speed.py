"""Fused kernels against eager PyTorch, torch.compile of the same reference, and liger-kernel where it has the op.

    python -m benchmarks.kernel_speed            # on a CUDA GPU: Wan 1.3B / 14B widths at 480P / 720P x 81 frames
    python -m benchmarks.kernel_speed --smoke    # tiny shapes, any device (checks the script, numbers mean nothing)

For each op: forward and forward+backward time (median), achieved bandwidth in GB/s (the bytes the op must move,
`traffic`: inputs read, outputs written, saved statistics) and its fraction of the device's measured copy bandwidth;
plus one DiT block forward+backward with the triton vs torch backend. Writes
benchmarks/results/kernel_speed-<device>.json and .md (smoke: a temporary folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"1.3b": 1536, "14b": 5120}
TOKENS = {"480p": 32_760, "720p": 75_600}  # 81 frames, patch (1, 2, 2)
HEAD_DIM = 128
H100_BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s (PERF_NOTES)
# The fraction of copy bandwidth a memory-bound kernel of each kind should reach (PERF_NOTES 3d: Liger's RMSNorm
# forward reaches 84% of H100 HBM; backward kernels typically land at 40-80%).
TARGET_FRACTION = {"forward": 0.75, "backward": 0.5}


def traffic(op: str, phase: str, width: int, dtype: torch.dtype) -> int:
    """Bytes one token's row must move through memory in the op's forward or backward kernel: tensors read and
    written (x and its gradients in `dtype`; the residual stream, its gradient and h in fp32), plus per-token
    statistics; per-sample modulation vectors and weights are read once and left out."""
    s = torch.empty(0, dtype=dtype).element_size()
    forward = phase == "forward"
    if op == "rms_norm":  # read x, write y + rstd | read dy, x + rstd, write dx
        return (2 if forward else 3) * s * width + 4
    if op == "modulated_layer_norm":  # the same with mean and rstd
        return (2 if forward else 3) * s * width + 8
    if op.startswith("residual_modulated_layer_norm"):
        # forward: read x (fp32), y; write x', h (fp32). backward: read dx', dh, x' (fp32), y when gated; write dx
        # (fp32), dy
        gated = op.endswith("(gated)")
        return ((12 + s) if forward else (16 + s + (s if gated else 0))) * width + 8
    if op == "rope":  # read x, write the rotated x, read the token's cos and sin tables (fp32)
        return 2 * s * width + 2 * HEAD_DIM // 2 * 4
    raise ValueError(f"unknown op {op!r}")


def timed(fn, repeats: int) -> float:
    """Median seconds of fn()."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, rep=repeats * 10, return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth(numel: int, device, repeats: int) -> float:
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), repeats)


def rms_norm_case(rows, dim, dtype, device):
    from engine.kernels.rms_norm import rms_norm, rms_norm_reference

    x = torch.randn(rows, dim, dtype=dtype, device=device, requires_grad=True)
    w = torch.rand(dim, dtype=dtype, device=device, requires_grad=True)
    impls = {"triton": lambda: rms_norm(x, w, 1e-6), "eager": lambda: rms_norm_reference(x, w, 1e-6)}
    # liger's kernels do not run in Triton's CPU interpreter; where liger-kernel is not installed, it is left out
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        impls["liger"] = lambda: LigerRMSNormFunction.apply(x, w, 1e-6)
    return impls, (x, w), rms_norm_reference, (x, w, 1e-6)


def modulated_layer_norm_case(rows, dim, dtype, device):
    from engine.kernels.modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_reference

    x = torch.randn(1, rows, dim, dtype=dtype, device=device, requires_grad=True)
    shift = torch.randn(1, 1, dim, device=device, requires_grad=True)
    scale = torch.randn(1, 1, dim, device=device, requires_grad=True)
    impls = {"triton": lambda: modulated_layer_norm(x, shift, scale, 1e-6),
             "eager": lambda: modulated_layer_norm_reference(x, shift, scale, 1e-6)}
    return impls, (x, shift, scale), modulated_layer_norm_reference, (x, shift, scale, 1e-6)


def residual_modulated_layer_norm_case(rows, dim, dtype, device):
    """As the DiT calls it: no gate; x is the fp32 residual stream, y the cross-attention output in `dtype`.
    Both outputs (x', h) are timed as they are, no concatenation."""
    from engine.kernels.modulated_layer_norm import residual_modulated_layer_norm, residual_modulated_layer_norm_reference

    x = torch.randn(1, rows, dim, device=device, requires_grad=True)
    y = torch.randn(1, rows, dim, dtype=dtype, device=device, requires_grad=True)
    shift, scale = (torch.randn(1, 1, dim, device=device, requires_grad=True) for _ in range(2))
    impls = {"triton": lambda: residual_modulated_layer_norm(x, y, None, shift, scale, 1e-6),
             "eager": lambda: residual_modulated_layer_norm_reference(x, y, None, shift, scale, 1e-6)}
    return impls, (x, y, shift, scale), residual_modulated_layer_norm_reference, (x, y, None, shift, scale, 1e-6)


def rope_case(rows, dim, dtype, device):
    from engine.model.dit import rope_for_grid
    from engine.kernels.rope import apply_rope, apply_rope_reference

    heads = max(1, dim // HEAD_DIM)
    head_dim = dim // heads
    x = torch.randn(1, rows, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    rope = rope_for_grid((1, 1, rows), head_dim, device)
    cos, sin = rope.cos.reshape(rows, -1).contiguous(), rope.sin.reshape(rows, -1).contiguous()
    # liger's RoPE rotates half-dims (HF layout), not Wan's adjacent pairs: not the same op, so not compared.
    impls = {"triton": lambda: apply_rope(x, cos, sin), "eager": lambda: apply_rope_reference(x, cos, sin)}
    return impls, (x,), apply_rope_reference, (x, cos, sin)


CASES = {"rms_norm": rms_norm_case, "modulated_layer_norm": modulated_layer_norm_case,
         "residual_modulated_layer_norm": residual_modulated_layer_norm_case, "rope": rope_case}


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


# Largest relative error (to the reference's largest magnitude) allowed of the fused kernel, as tests/test_kernels.py
# allows it: outputs and gradients in the op's dtype, and fp32 modulation gradients.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def parity(name: str, rows: int, dim: int, dtype: torch.dtype, device) -> dict:
    """The fused kernel against its PyTorch reference on the same inputs and upstream gradients: the largest
    relative error of every output and input gradient, and whether each is within TOLERANCE of its dtype."""
    impls, leaves, _, _ = CASES[name](rows, dim, dtype, device)
    results = {}
    for impl in ("triton", "eager"):
        torch.manual_seed(0)
        outputs = _outputs(impls[impl]())
        grads = [torch.randn_like(t) for t in outputs]
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(outputs, grads)
        results[impl] = [t.detach() for t in outputs] + [leaf.grad for leaf in leaves]
    errors = {}
    for index, (ours, reference) in enumerate(zip(*results.values())):
        scale = reference.float().abs().max().clamp_min(1e-12)
        errors[f"tensor_{index}"] = {"relative_error": ((ours.float() - reference.float()).abs().max() / scale).item(),
                                     "tolerance": TOLERANCE[reference.dtype]}
    return {"op": name, "rows": rows, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
            "passed": all(e["relative_error"] <= e["tolerance"] for e in errors.values()), "errors": errors}


def bench_op(name, rows, dim, dtype, device, repeats, bandwidth, compile_reference):
    impls, leaves, reference, ref_args = CASES[name](rows, dim, dtype, device)
    if compile_reference:
        compiled = torch.compile(reference)
        impls["torch.compile"] = lambda: compiled(*ref_args)
    # The op's rows as one token each: bytes per token x rows (RoPE's x is [1, rows, heads, Dh], also a row a token)
    fwd_bytes = rows * traffic(name, "forward", dim, dtype)
    fwd_bwd_bytes = fwd_bytes + rows * traffic(name, "backward", dim, dtype)
    rows_out = []
    for impl, fn in impls.items():
        grads = [torch.randn_like(t) for t in _outputs(fn())]

        def fwd_bwd():
            for leaf in leaves:
                leaf.grad = None
            torch.autograd.backward(_outputs(fn()), grads)

        with torch.no_grad():
            forward = timed(fn, repeats)
        both = timed(fwd_bwd, repeats)
        rows_out.append({"op": name, "impl": impl, "rows": rows, "dim": dim, "dtype": str(dtype).split(".")[-1],
                         "forward_ms": forward * 1e3, "forward_backward_ms": both * 1e3,
                         "forward_gbps": fwd_bytes / forward / 1e9, "forward_backward_gbps": fwd_bwd_bytes / both / 1e9,
                         "forward_fraction_of_copy": fwd_bytes / forward / bandwidth,
                         "forward_backward_fraction_of_copy": fwd_bwd_bytes / both / bandwidth})
    return rows_out


def bench_block(dim, tokens, device, repeats):
    """One Wan block forward+backward (bf16 weights on GPU) with each kernel backend."""
    from engine.model.dit import Block, DiTConfig, rope_for_grid

    result = {}
    heads = max(1, dim // HEAD_DIM) if dim >= HEAD_DIM else 2
    for backend in ("torch", "triton"):
        cfg = DiTConfig(dim=dim, ffn_dim=4 * dim, num_heads=heads, kernel_backend=backend, text_dim=dim)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        block = Block(cfg).to(device, dtype)
        x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
        e6 = torch.randn(1, 6, dim, device=device)
        context = torch.randn(1, 512, dim, device=device, dtype=dtype)
        rope = rope_for_grid((1, 1, tokens), cfg.head_dim, device)

        def step():
            x.grad = None
            block(x, e6, context, rope).sum().backward()

        result[backend] = timed(step, repeats) * 1e3
    return {"dim": dim, "tokens": tokens, "torch_ms": result["torch"], "triton_ms": result["triton"],
            "speedup": result["torch"] / result["triton"]}


def run(smoke: bool, repeats: int, sizes: list[tuple[str, int, int]] | None = None, blocks: bool = True,
        dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32), compile_reference: bool | None = None
        ) -> dict:
    """The measurements as a report dict; `sizes` (label, width, tokens) default to Wan's (smoke: one tiny one);
    torch.compile of the reference is timed too on a GPU unless `compile_reference` is False."""
    cuda = torch.cuda.is_available()
    compile_reference = cuda if compile_reference is None else compile_reference
    device = torch.device("cuda" if cuda else "cpu")
    sizes = sizes or ([("small", 48, 33)] if smoke else
                      [(f"{m}-{r}", WIDTHS[m], TOKENS[r]) for m in WIDTHS for r in TOKENS])
    bandwidth = copy_bandwidth(max(n * d for _, d, n in sizes), device, repeats)
    results = []
    for label, dim, tokens in sizes:
        for dtype in dtypes:
            for name in CASES:
                for row in bench_op(name, tokens, dim, dtype, device, repeats, bandwidth, compile_reference):
                    results.append({"size": label, **row})
                    print(results[-1], flush=True)
    block_rows = []
    if blocks:  # at 480P for both widths (in smoke mode, a small width)
        block_rows = ([bench_block(64, 32, device, repeats)] if smoke else
                      [bench_block(dim, tokens, device, repeats) for label, dim, tokens in sizes
                       if label.endswith("480p")])
    return {"device": torch.cuda.get_device_name() if cuda else "cpu-interpreter",
            "copy_bandwidth_gbps": bandwidth / 1e9, "smoke": smoke, "ops": results, "blocks": block_rows}


def write_report(report: dict, results_dir: Path) -> Path:
    device_name = report["device"]
    out = results_dir / f"kernel_speed-{device_name.replace(' ', '_')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Kernels on {device_name}", "", f"Measured copy bandwidth: {report['copy_bandwidth_gbps']:.0f} GB/s. "
             "Bandwidth counts the bytes each op must move (benchmarks/kernel_speed.py, `traffic`). Regenerate: "
             "`python -m benchmarks.kernel_speed`.", "",
             "| op | size | dtype | impl | fwd ms | fwd+bwd ms | fwd % copy | fwd+bwd % copy |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['size']} | {r['dtype']} | {r['impl']} | {r['forward_ms']:.3f} | "
              f"{r['forward_backward_ms']:.3f} | {100 * r['forward_fraction_of_copy']:.0f} | "
              f"{100 * r['forward_backward_fraction_of_copy']:.0f} |" for r in report["ops"]]
    if report["blocks"]:
        lines += ["", "| block dim | tokens | torch ms | triton ms | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {b['dim']} | {b['tokens']} | {b['torch_ms']:.2f} | {b['triton_ms']:.2f} | {b['speedup']:.2f} |"
                  for b in report["blocks"]]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (TRITON_INTERPRET on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.smoke:
            parser.exit(2, "kernel timings need a CUDA GPU; use --smoke to check the script on a CPU\n")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = run(args.smoke, 2 if args.smoke else args.repeats)
    out = write_report(report, args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results"))
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
