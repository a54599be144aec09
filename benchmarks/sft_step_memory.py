"""Peak GPU memory and step time of a real SFT step, with block checkpointing, with and without activation offload.

    python -m benchmarks.sft_step_memory                      # Wan2.1-1.3B at 480P x 81 frames (32,760 tokens)
    python -m benchmarks.sft_step_memory --preset wan2.1-t2v-14b --latent 21 90 160
    python -m benchmarks.sft_step_memory --smoke              # the tiny model on any device (checks the script)

Each case runs in its own process on one GPU (benchmarks/child.py) through the real engine (DeepSpeed ZeRO-3,
optimizer on the CPU, bf16), with random weights and data (cost does not depend on values): one warm-up step, then
the median of `--steps` timed optimizer steps. An out-of-memory error, while the trainer is built or in a step, is the
case's status. Writes benchmarks/results/sft_step-<device>.json and .md (smoke: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.child import is_out_of_memory, report_case, run_case_in_child

ROOT = Path(__file__).resolve().parents[1]
CASES = {"checkpointing": ["memory.checkpointing=true", "memory.offload=false"],
         "checkpointing+offload": ["memory.checkpointing=true", "memory.offload=true"]}
SMOKE = dict(preset="tiny", latent=[3, 4, 6], text_tokens=16, steps=1)


def run_case(case: dict) -> dict:
    """One case in this process."""
    import torch

    from engine.config_io import load_config
    from engine.steps.sft import SFTStep
    from engine.train.trainer import Trainer

    cuda = torch.cuda.is_available()  # the smoke cases run on a CPU
    doing = "building the trainer"
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.preset={case['preset']}", f"data.latent_shape={list(case['latent'])}",
                     "data.num_samples=2", f"data.text_tokens={case['text_tokens']}", f"output_dir={run_dir}",
                     "train.export=false", *CASES[case["case"]]]
        try:
            config = load_config(ROOT / "configs/tiny.yaml", overrides)
            trainer = Trainer(config, json.loads((ROOT / case["ds_config"]).read_text()))
            step = SFTStep(config.sft, trainer.dataset.null_context.to(trainer.device))
            doing = "the warm-up step"
            trainer.train_step(step)  # allocator, DeepSpeed buffers, CPU Adam
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # building the model left fp32 copies in the cache; not the step's
                torch.cuda.reset_peak_memory_stats()
            doing = "the timed steps"
            times = []
            for _ in range(case["steps"]):
                started = time.perf_counter()
                trainer.train_step(step)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        except Exception as e:
            if is_out_of_memory(e):
                return {"status": "OOM", "while": doing, "error": str(e).splitlines()[0]}
            raise
        tokens = 1
        for size, patch in zip(case["latent"], trainer.model.config.patch_size):
            tokens *= size // patch
        return {"status": "ok", "step_time_s": statistics.median(times), "steps_timed": len(times),
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None, "tokens": tokens,
                "tokens_per_s": tokens / statistics.median(times)}


def measure(setting: dict, timeout: float, deadline: float | None = None) -> list[dict]:
    """Both cases of one setting (preset, latent, text_tokens, ds_config, steps), each in its own process, each
    within `timeout` seconds and all by `deadline` (time.monotonic()), if given; a case not reached says so."""
    results = []
    for name in CASES:
        started = time.monotonic()
        left = timeout if deadline is None else min(timeout, deadline - started)
        if left < 10:
            results.append({"case": name, "status": "not reached (time limit)"})
            continue
        result = run_case_in_child("benchmarks.sft_step_memory", {**setting, "case": name}, left)
        results.append({"case": name, **result, "seconds": round(time.monotonic() - started, 1)})
        print(results[-1], flush=True)
    return results


def write_report(report: dict, results_dir: Path) -> Path:
    out = results_dir / f"sft_step-{report['device'].replace(' ', '_')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2))
    rows = []
    for r in report["results"]:
        figures = [r.get(k) for k in ("step_time_s", "peak_allocated_gb", "peak_reserved_gb")]
        rows.append(f"| {r['case']} | {r['status']} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in figures)
                    + " |")
    Path(f"{out}.md").write_text(
        f"# SFT step memory: {report['preset']}, latent {tuple(report['latent'])}, {report['device']}\n\n"
        f"One GPU, {report['ds_config']}, {report['precision']}, median of {report['steps']} steps after one warm-up. "
        "Regenerate: `python -m benchmarks.sft_step_memory`.\n\n"
        "| case | status | step time (s) | peak allocated (GB) | peak reserved (GB) |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), metavar=("F", "H", "W"))
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--ds-config", default="ds_configs/z3_offload.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is abandoned")
    parser.add_argument("--smoke", action="store_true", help="the tiny model at a tiny latent, on any device")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, run by the parent process
    args = parser.parse_args()
    if args.case:
        return report_case(lambda: run_case(json.loads(args.case)))

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.exit(2, "this benchmark measures GPU memory: run it on a CUDA GPU, or use --smoke\n")
    setting = {"preset": args.preset, "latent": list(args.latent), "text_tokens": args.text_tokens,
               "ds_config": args.ds_config, "steps": args.steps, **(SMOKE if args.smoke else {})}
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", **setting,
              "precision": "bf16" if cuda else "fp32", "gpus": 1, "sp_size": 1,
              "results": measure(setting, args.case_timeout)}
    out = write_report(report, args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results"))
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
