"""The CPU benchmark scripts' reports: `<name>-cpu.json` (every setting and number) and `<name>-cpu.md` (the same as
a table), in benchmarks/results or, for a smoke run without --out, in a temporary folder."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import engine.synthetic  # noqa: F401  (the synthetic benchmark's presets, which the smoke models use)
from engine.model.weights import save_dit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """The fields every report starts with: where it was measured."""
    return {"device": platform.processor() or platform.machine(), "threads": os.cpu_count()}


def write_report(name: str, report: dict, markdown: str, out: Path | None, smoke: bool) -> Path:
    """Write the report's JSON and Markdown; returns their common stem."""
    results_dir = out or (Path(tempfile.mkdtemp()) if smoke else RESULTS)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{name}-cpu"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    Path(f"{stem}.md").write_text(markdown)
    print(f"wrote {stem}.json and .md")
    return stem


def run_recipe(runner: str, args: list[str], run_dir: Path, result: str) -> dict:
    """`python runners/<runner>.py args` (the args name `output_dir=run_dir`) from the repository root, in a fresh
    run folder; the JSON the run writes to `run_dir/result`, with its command line and wall time."""
    cmd = [sys.executable, f"runners/{runner}.py", *args]
    shutil.rmtree(ROOT / run_dir, ignore_errors=True)  # a fresh run, never another run's checkpoints
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"command": " ".join(cmd[1:]), "seconds": round(time.time() - started, 1),
            **json.loads((ROOT / run_dir / result).read_text())}


def commands(runs: list[dict]) -> list[str]:
    """The Markdown lines that end a report: each run's command line, to rerun it."""
    return ["", "Commands (from the repository root):", "", *(f"    python {run['command']}" for run in runs)]


def smoke_models(folder: Path, preset: str = "synthetic") -> tuple[Path, Path]:
    """For smoke runs given no models: a random generator of a synthetic benchmark's preset (`synthetic-i2v`: the
    first-frame variant) and a one-block PAVRM on its trunk, written to folder/base and folder/pavrm."""
    import torch

    from engine.model.dit import DiT, DiTConfig
    from engine.model.reward import RewardModel, RewardModelConfig

    torch.manual_seed(0)
    base, pavrm = folder / "base", folder / "pavrm"
    save_dit(DiT(DiTConfig.preset(preset)), base)
    trunk = DiT(DiTConfig.preset(preset, num_layers=1))
    RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)), trunk).save_pretrained(pavrm)
    return base, pavrm


def cell(value: float | None) -> str:
    """A table figure; '-' where nothing was measured (None, or nan: e.g. no sample the judge could track)."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"
