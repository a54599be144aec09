"""Peak GPU memory and step time of a real SFT step, with block checkpointing, with and without activation offload.

    python benchmarks/sft_step_memory.py                      # Wan2.1-1.3B at 480P x 81 frames (32,760 tokens)
    python benchmarks/sft_step_memory.py --preset wan2.1-t2v-14b --latent 21 90 160

Each case runs in its own process on one GPU through the real engine (DeepSpeed ZeRO-3, optimizer on the CPU,
bf16), with random weights and data (cost does not depend on values): one warm-up step, then the median of
`--steps` timed optimizer steps. Writes benchmarks/results/sft_step-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"checkpointing": ["memory.checkpointing=true", "memory.offload=false"],
         "checkpointing+offload": ["memory.checkpointing=true", "memory.offload=true"]}


def run_case(args) -> dict:
    import torch

    from engine.config import load_config
    from engine.sft import SFTStep
    from engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.preset={args.preset}", f"data.latent_shape={list(args.latent)}", "data.num_samples=2",
                     f"data.text_tokens={args.text_tokens}", f"output_dir={run_dir}", "train.export=false",
                     *CASES[args.case]]
        config = load_config(ROOT / "configs/tiny.yaml", overrides)
        ds_config = json.loads((ROOT / args.ds_config).read_text())
        trainer = Trainer(config, ds_config)
        step = SFTStep(config.sft, trainer.dataset.null_context.to(trainer.device))
        cuda = torch.cuda.is_available()  # the single case also runs on a CPU, as a smoke test of this script
        try:
            trainer.train_step(step)  # warm-up: allocator, DeepSpeed buffers, CPU Adam
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                trainer.train_step(step)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        except torch.cuda.OutOfMemoryError:
            return {"case": args.case, "status": "OOM"}
        tokens = 1
        for size, patch in zip(args.latent, trainer.model.config.patch_size):
            tokens *= size // patch
        return {"case": args.case, "status": "ok", "step_time_s": statistics.median(times), "steps_timed": len(times),
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None, "tokens": tokens,
                "tokens_per_s": tokens / statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), metavar=("F", "H", "W"))
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--ds-config", default="ds_configs/z3_offload.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (used internally)")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        parser.exit(2, "this benchmark measures GPU memory: run it on a machine with a CUDA GPU\n")
    device = torch.cuda.get_device_name()
    results = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--latent", *map(str, args.latent),
               "--text-tokens", str(args.text_tokens), "--ds-config", args.ds_config, "--steps", str(args.steps)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else
                       {"case": case, "status": f"failed ({done.returncode})", "stderr": done.stderr[-2000:]})
        print(results[-1], flush=True)

    report = {"device": device, "preset": args.preset, "latent": list(args.latent), "text_tokens": args.text_tokens,
              "ds_config": args.ds_config, "precision": "bf16", "gpus": 1, "sp_size": 1, "results": results}
    out = ROOT / "benchmarks/results" / f"sft_step-{device.replace(' ', '_')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    rows = [f"| {r['case']} | {r['status']} | {r.get('step_time_s', float('nan')):.2f} | "
            f"{r.get('peak_allocated_gb', float('nan')):.2f} | {r.get('peak_reserved_gb', float('nan')):.2f} |"
            for r in results]
    out.with_suffix(".md").write_text(
        f"# SFT step memory: {args.preset}, latent {tuple(args.latent)}, {device}\n\n"
        f"One GPU, {args.ds_config}, bf16, median of {args.steps} steps after one warm-up.\n\n"
        "| case | status | step time (s) | peak allocated (GB) | peak reserved (GB) |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
