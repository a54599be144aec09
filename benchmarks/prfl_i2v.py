"""PRFL on the first-frame (image-to-video) variant of the synthetic benchmark: the recipe's run from its base
generator against its PAVRM, and what it changed on held-out pairs, each conditioned on a rendered first frame.

    python -m benchmarks.prfl_i2v                 # configs/prfl-synthetic-i2v.yaml with assets/synthetic-i2v
    python -m benchmarks.prfl_i2v --smoke         # random models, a few steps: checks the script

Two `runners/prfl.py --config configs/prfl-synthetic-i2v.yaml` runs (bootstrap off: the base and PAVRM folders must
exist; `runners/synthetic.py bootstrap --recipe configs/prfl-synthetic-i2v.yaml` trains them): the recipe, and its SFT
loss alone (`prfl.weight=1e-6`), to tell what the reward adds. Their summaries, before and after: the judge's pass
rate and first-frame adherence (frame 0 within MAX_START_DISTANCE of the condition's object) on the recipe's held-out
pairs with Wilson 95% intervals, the mean reward, the motion's spread across seeds of a prompt (the condition fixes
the start) and the wall time; beside them the same for the rendered smooth videos of those pairs, the data's own
spread. Writes benchmarks/results/prfl_i2v-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_report import ROOT, cell, commands, machine, run_recipe, smoke_models, write_report

RECIPE = "configs/prfl-synthetic-i2v.yaml"
SMOKE = ["train.steps=2", "sampling.steps=3", "eval.held_out_pairs=8", "eval.batch_size=8", "train.micro_batch_size=1"]
RUNS = {"recipe": [], "SFT alone": ["prfl.weight=1e-6"]}
ROWS = {"pass_rate": "judge pass", "first_frame_rate": "first frame kept", "reward_mean": "mean reward",
        "median_start_distance_px": "start distance (px)", "motion_spread_px": "motion spread (px)"}


def train(base: Path, reward: Path, run_dir: Path, overrides: list[str]) -> dict:
    args = ["--ds_config", "ds_configs/z3_offload.json", "--config", RECIPE, f"model.path={base}",
            f"reward.path={reward}", "bootstrap.enabled=false", f"output_dir={run_dir}", *overrides]
    return run_recipe("prfl", args, run_dir, "summary.json")


def rendered(pairs: int) -> dict:
    """The judge's summary of the rendered smooth videos of the first `pairs` held-out pairs, each against its own
    first frame: what a generator that learned the data would score."""
    from engine.synthetic.dataset import held_out_pairs
    from engine.synthetic.judge import judge, summarize
    from engine.synthetic.scene import condition_frame, first_frame_inputs, render

    chosen = held_out_pairs(pairs)
    verdicts = [judge(render(p, "smooth", s), p, condition_frame(first_frame_inputs(p, "smooth", s)["y"]))
                for p, s in chosen]
    return summarize(verdicts, [p for p, _ in chosen])


def interval(result: dict, key: str) -> str:
    if result.get(key) is None:
        return "-"
    return f"{result[key]:.3f} [{result[key + '_ci95_low']:.3f}, {result[key + '_ci95_high']:.3f}]"


def markdown(report: dict) -> str:
    runs, data = report["runs"], report["rendered"]
    before = runs["recipe"]["before"]
    lines = [f"# PRFL on the first-frame (i2v) variant (synthetic benchmark, {report['device']}, {report['threads']} "
             "threads)", "", f"`{RECIPE}` from `{report['base']}` against `{report['reward']}`, "
             f"{runs['recipe']['after']['step']} steps, and the same with its SFT loss alone (`prfl.weight=1e-6`); the "
             f"judge on {before['samples']} held-out (prompt, seed) pairs, each conditioned on the first frame of its "
             "rendered smooth video. Rates with their Wilson 95% intervals; one training seed each. Rendered: the "
             "smooth videos of the same pairs (the data's own spread of motion).", "",
             "| | base | PRFL (recipe) | SFT alone | rendered |", "|---|---|---|---|---|"]
    for key, name in ROWS.items():
        values = [before, runs["recipe"]["after"], runs["SFT alone"]["after"], data]
        if key in ("pass_rate", "first_frame_rate"):
            lines.append(f"| {name} | " + " | ".join(interval(v, key) for v in values) + " |")
        else:
            lines.append(f"| {name} | " + " | ".join(cell(v.get(key)) for v in values) + " |")
    lines.append("| minutes | | " + " | ".join(f"{runs[r]['seconds'] / 60:.1f}" for r in RUNS) + " | |")
    lines += commands(list(runs.values()))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base generator (default: assets/synthetic-i2v/base; --smoke: "
                                                  "a random one)")
    parser.add_argument("--reward", type=Path, help="PAVRM (default: assets/synthetic-i2v/pavrm; --smoke: a random "
                                                    "one)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few pairs: checks the script only")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/results; smoke: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prfl_i2v-")) if args.smoke else Path("outputs/prfl_i2v")
    if args.smoke and args.base is None and args.reward is None:
        args.base, args.reward = smoke_models(work / "models", preset="synthetic-i2v")
    args.base = args.base or Path("assets/synthetic-i2v/base")
    args.reward = args.reward or Path("assets/synthetic-i2v/pavrm")
    for name, folder in (("--base", args.base), ("--reward", args.reward)):
        if not (ROOT / folder).is_dir():
            raise SystemExit(f"{name} {folder} is not a folder: `python runners/synthetic.py bootstrap --recipe "
                             f"{RECIPE}` trains the variant's base generator and PAVRM")
    runs = {name: train(args.base, args.reward, work / name.replace(" ", "-"), overrides + (SMOKE if args.smoke else []))
            for name, overrides in RUNS.items()}
    pairs = runs["recipe"]["before"]["samples"]
    report = {**machine(), "smoke": args.smoke, "base": str(args.base), "reward": str(args.reward), "runs": runs,
              "rendered": rendered(pairs)}
    write_report("prfl_i2v", report, markdown(report), args.out, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
