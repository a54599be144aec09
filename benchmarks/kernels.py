"""Fused kernels against eager PyTorch, torch.compile of the same reference, and liger-kernel where it has the op.

    python benchmarks/kernels.py            # on a CUDA GPU: Wan 1.3B / 14B widths at 480P / 720P x 81 frames
    python benchmarks/kernels.py --smoke    # tiny shapes, any device (checks the script, numbers mean nothing)

For each op: forward and forward+backward time (median), achieved bandwidth in GB/s (bytes that must move: inputs
read, outputs written, saved statistics) and its fraction of the device's measured copy bandwidth; plus one DiT
block forward+backward with the triton vs torch backend. Writes benchmarks/results/kernels-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This script's own name shadows the `kernels` package when run as a file: drop its folder from the path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"1.3b": 1536, "14b": 5120}
TOKENS = {"480p": 32_760, "720p": 75_600}  # 81 frames, patch (1, 2, 2)


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
    from kernels.rms_norm import rms_norm, rms_norm_reference

    x = torch.randn(rows, dim, dtype=dtype, device=device, requires_grad=True)
    w = torch.rand(dim, dtype=dtype, device=device, requires_grad=True)
    size = x.element_size()
    impls = {"triton": lambda: rms_norm(x, w, 1e-6), "eager": lambda: rms_norm_reference(x, w, 1e-6)}
    if device.type == "cuda":  # liger's kernels do not run in Triton's CPU interpreter
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        impls["liger"] = lambda: LigerRMSNormFunction.apply(x, w, 1e-6)
    # forward: read x, write y (+ rstd); backward: read dy, x, write dx
    return impls, (x, w), rows * dim * size * 2, rows * dim * size * 5, rms_norm_reference, (x, w, 1e-6)


def modulated_layer_norm_case(rows, dim, dtype, device):
    from kernels.modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_reference

    x = torch.randn(1, rows, dim, dtype=dtype, device=device, requires_grad=True)
    shift = torch.randn(1, 1, dim, device=device, requires_grad=True)
    scale = torch.randn(1, 1, dim, device=device, requires_grad=True)
    size = x.element_size()
    impls = {"triton": lambda: modulated_layer_norm(x, shift, scale, 1e-6),
             "eager": lambda: modulated_layer_norm_reference(x, shift, scale, 1e-6)}
    return (impls, (x, shift, scale), rows * dim * size * 2, rows * dim * size * 5, modulated_layer_norm_reference,
            (x, shift, scale, 1e-6))


def residual_modulated_layer_norm_case(rows, dim, dtype, device):
    from kernels.modulated_layer_norm import residual_modulated_layer_norm, residual_modulated_layer_norm_reference

    x = torch.randn(1, rows, dim, device=device, requires_grad=True)  # the fp32 residual stream
    y = torch.randn(1, rows, dim, dtype=dtype, device=device, requires_grad=True)
    gate, shift, scale = (torch.randn(1, 1, dim, device=device, requires_grad=True) for _ in range(3))

    def fused():
        return torch.cat(residual_modulated_layer_norm(x, y, gate, shift, scale, 1e-6), dim=-1)

    def eager():
        return torch.cat(residual_modulated_layer_norm_reference(x, y, gate, shift, scale, 1e-6), dim=-1)

    # forward: read x (fp32), y; write x', h (fp32); backward: read dx', dh, x', y; write dx, dy
    unit = rows * dim
    return ({"triton": fused, "eager": eager}, (x, y, gate, shift, scale), unit * (4 + y.element_size() + 8),
            unit * (2 * (4 + y.element_size() + 8) + 8 + 4 + y.element_size()),
            lambda *a: torch.cat(residual_modulated_layer_norm_reference(*a), dim=-1), (x, y, gate, shift, scale, 1e-6))


def rope_case(rows, dim, dtype, device):
    from engine.dit import rope_for_grid
    from kernels.rope import apply_rope, apply_rope_reference

    heads = {1536: 12, 5120: 40}.get(dim, 1)
    head_dim = dim // heads
    x = torch.randn(1, rows, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    rope = rope_for_grid((1, 1, rows), head_dim, device)
    cos, sin = rope.cos.reshape(rows, -1).contiguous(), rope.sin.reshape(rows, -1).contiguous()
    size = x.element_size()
    # liger's RoPE rotates half-dims (HF layout), not Wan's adjacent pairs: not the same op, so not compared.
    impls = {"triton": lambda: apply_rope(x, cos, sin), "eager": lambda: apply_rope_reference(x, cos, sin)}
    tables = 2 * rows * (dim // heads // 2) * 4
    return (impls, (x,), rows * dim * size * 2 + tables, rows * dim * size * 4 + 2 * tables, apply_rope_reference,
            (x, cos, sin))


def bench_op(name, case, rows, dim, dtype, device, repeats, bandwidth, compile_reference):
    impls, leaves, fwd_bytes, fwd_bwd_bytes, reference, ref_args = case(rows, dim, dtype, device)
    if compile_reference:
        compiled = torch.compile(reference)
        impls["torch.compile"] = lambda: compiled(*ref_args)
    rows_out = []
    for impl, fn in impls.items():
        grad = torch.randn_like(fn())

        def fwd_bwd():
            for leaf in leaves:
                leaf.grad = None
            fn().backward(grad)

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
    from engine.dit import Block, DiTConfig, rope_for_grid

    result = {}
    heads = {1536: 12, 5120: 40}.get(dim, max(1, dim // 64))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (TRITON_INTERPRET on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.exit(2, "kernel timings need a CUDA GPU; use --smoke to check the script on a CPU\n")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    sizes = ([("small", 48, 33)] if args.smoke else
             [(f"{m}-{r}", WIDTHS[m], TOKENS[r]) for m in WIDTHS for r in TOKENS])
    repeats = 2 if args.smoke else args.repeats
    bandwidth = copy_bandwidth(max(n * d for _, d, n in sizes), device, repeats)
    ops = {"rms_norm": rms_norm_case, "modulated_layer_norm": modulated_layer_norm_case,
           "residual_modulated_layer_norm": residual_modulated_layer_norm_case, "rope": rope_case}
    results = []
    for label, dim, tokens in sizes:
        for dtype in (torch.bfloat16, torch.float32):
            for name, case in ops.items():
                for row in bench_op(name, case, tokens, dim, dtype, device, repeats, bandwidth, compile_reference=cuda):
                    results.append({"size": label, **row})
                    print(results[-1], flush=True)
    # Blocks at 480P for both widths (in smoke mode, a small even-headed width).
    blocks = ([bench_block(64, 128, device, repeats)] if args.smoke else
              [bench_block(dim, tokens, device, repeats) for label, dim, tokens in sizes if label.endswith("480p")])
    device_name = torch.cuda.get_device_name() if cuda else "cpu-interpreter"
    report = {"device": device_name, "copy_bandwidth_gbps": bandwidth / 1e9, "smoke": args.smoke, "ops": results,
              "blocks": blocks}
    results_dir = Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results"  # smoke: not a report
    out = results_dir / f"kernels-{device_name.replace(' ', '_')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# Kernels on {device_name}", "", f"Measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s.", "",
             "| op | size | dtype | impl | fwd ms | fwd+bwd ms | fwd % copy | fwd+bwd % copy |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['size']} | {r['dtype']} | {r['impl']} | {r['forward_ms']:.3f} | "
              f"{r['forward_backward_ms']:.3f} | {100 * r['forward_fraction_of_copy']:.0f} | "
              f"{100 * r['forward_backward_fraction_of_copy']:.0f} |" for r in results]
    lines += ["", "| block dim | tokens | torch ms | triton ms | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {b['dim']} | {b['tokens']} | {b['torch_ms']:.2f} | {b['triton_ms']:.2f} | {b['speedup']:.2f} |"
              for b in blocks]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
