"""Where in the sampling chain PRFL's gradient step should fall (the paper's stage ablation), on the synthetic motion
benchmark: the embedded default run (configs/prfl-synthetic.yaml) once per `prfl.stage`, same budget, same assets.

    python -m benchmarks.prfl_stages                          # all, early, middle, late, last_quarter (2 cores: ~5 min)
    python -m benchmarks.prfl_stages --stages all last_quarter  # the whole chain against RGB-ReFL-style late-only k
    python -m benchmarks.prfl_stages --smoke --stages all last_quarter   # random models, a few steps: checks the script

The paper's claim is that supervising the whole chain beats supervising only the nearly clean end (`last_quarter`,
what RGB ReFL can reach). Each run trains from the same base generator against the same PAVRM
(`runners/synthetic.py bootstrap` writes both to assets/synthetic) and reports the judge on the recipe's held-out
(prompt, seed) pairs before and after: pass rate, mean reward, objects tracked in every frame, the median largest
acceleration and direction cosine, and the trajectory diversity kept. Runs go to outputs/prfl_stages/<stage>; writes
benchmarks/results/prfl_stages-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_report import ROOT, cell, commands, machine, run_recipe, smoke_models, write_report

STAGES = ("all", "early", "middle", "late", "last_quarter")
COLUMNS = {"pass_rate": "pass", "reward_mean": "reward", "tracked_rate": "tracked in every frame",
           "median_max_acceleration_px": "largest acceleration (px)", "median_direction_cosine": "direction cosine"}
SMOKE = ["train.steps=2", "sampling.steps=3", "eval.held_out_pairs=4", "eval.batch_size=4", "train.micro_batch_size=1"]


def train(stage: str, base: Path, reward: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One `runners/prfl.py` run of the embedded default with k drawn from `stage`; its summary plus the wall time."""
    args = ["--ds_config", "ds_configs/z3_offload.json", f"model.path={base}", f"reward.path={reward}",
            "bootstrap.enabled=false", f"prfl.stage={stage}", f"output_dir={run_dir}", *overrides]
    return {"stage": stage, **run_recipe("prfl", args, run_dir, "summary.json")}


def markdown(report: dict) -> str:
    before = report["runs"][0]["before"]
    lines = [f"# PRFL by stage of the chain (synthetic benchmark, {report['device']}, {report['threads']} threads)",
             "", f"The embedded default run (`configs/prfl-synthetic.yaml`) from `{report['base']}` against "
             f"`{report['reward']}`, with step k drawn uniformly from each stage of the chain; the judge on "
             f"{before['samples']} held-out (prompt, seed) pairs. Diversity: the trajectory spread kept, as a share of "
             "the base's.", "",
             "| stage | " + " | ".join(COLUMNS.values()) + " | diversity | run |", "|---" * (len(COLUMNS) + 3) + "|",
             "| base | " + " | ".join(cell(before[key]) for key in COLUMNS) + " | 1.00 | |"]
    for run in report["runs"]:
        lines.append(f"| {run['stage']} | " + " | ".join(cell(run["after"][key]) for key in COLUMNS) +
                     f" | {cell(run['diversity_ratio'])} | {run['seconds'] / 60:.1f} min |")
    lines += commands(report["runs"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base generator export (default: assets/synthetic/base; --smoke: "
                                                  "a random one)")
    parser.add_argument("--reward", type=Path, help="PAVRM folder (default: assets/synthetic/pavrm; --smoke: a random "
                                                    "one)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few pairs: checks the script only")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/results; smoke: a temporary one)")
    args = parser.parse_args()
    # The runs stay under outputs/ for a look at their samples and metrics; smoke runs go to a temporary folder.
    work = Path(tempfile.mkdtemp(prefix="prfl_stages-")) if args.smoke else Path("outputs/prfl_stages")
    if args.smoke and args.base is None and args.reward is None:
        args.base, args.reward = smoke_models(work / "models")
    args.base = args.base or Path("assets/synthetic/base")
    args.reward = args.reward or Path("assets/synthetic/pavrm")
    for name, folder in (("--base", args.base), ("--reward", args.reward)):
        if not (ROOT / folder).is_dir():
            raise SystemExit(f"{name} {folder} is not a folder: `python runners/synthetic.py bootstrap --out "
                             "assets/synthetic` trains the benchmark's base generator and PAVRM")
    runs = [train(stage, args.base, args.reward, work / stage, SMOKE if args.smoke else []) for stage in args.stages]
    report = {**machine(), "smoke": args.smoke, "base": str(args.base), "reward": str(args.reward), "runs": runs}
    write_report("prfl_stages", report, markdown(report), args.out, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
