"""The PAVRM's accuracy against the noise level on the synthetic motion benchmark (the paper's process-awareness
table), from `runners/pavrm.py` runs of the committed recipe.

    python -m benchmarks.pavrm_accuracy --generator assets/synthetic/base     # CE, then BT: about 8 min on 2 cores
    python -m benchmarks.pavrm_accuracy --smoke         # a few steps on a random generator: checks the script

For each loss (CE on `motion_quality`; BT on the benchmark's (smooth, bad kind) pairs of one prompt) it trains a
PAVRM with configs/pavrm-synthetic.yaml on the generator's first blocks, in one process on the CPU, and reports its
final validation: accuracy and ROC-AUC in each of the five sigma intervals (one random sigma per held-out sample
and interval) and the training's wall time. Writes benchmarks/results/pavrm_accuracy-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_report import commands, machine, run_recipe, smoke_models, write_report

RECIPE = "configs/pavrm-synthetic.yaml"
INTERVALS = ("[0.0,0.2]", "(0.2,0.4]", "(0.4,0.6]", "(0.6,0.8]", "(0.8,1.0]")
# BT forwards both videos of a pair: 8 pairs make the 16 forwards of a CE step.
PER_LOSS = {"ce": [], "bt": ["train.micro_batch_size=8"]}
SMOKE = ["train.steps=2", "train.eval_every=2", "reward.sigma_warmup_steps=2", "data.val_num_samples=96",
         "train.micro_batch_size=2"]


def train(generator: str, loss: str, run_dir: Path, overrides: list[str]) -> dict:
    """One `runners/pavrm.py` run; its final validation record plus the wall time."""
    args = ["--ds_config", "ds_configs/z2.json", "--config", RECIPE, f"model.path={generator}", f"reward.loss={loss}",
            f"output_dir={run_dir}", *overrides]
    return run_recipe("pavrm", args, run_dir, "validation.json")


def markdown(report: dict) -> str:
    lines = [f"# PAVRM accuracy by noise level (synthetic benchmark, {report['device']}, {report['threads']} "
             f"threads)", "", f"Recipe `{RECIPE}`, trunk from `{report['generator']}`. Accuracy on held-out "
             "samples, one random sigma per sample in each interval (CE: logit > 0 matches `motion_quality`, ROC-AUC "
             "in brackets; BT: the preferred video of a pair scores higher).", "",
             "| loss | " + " | ".join(INTERVALS) + " | mean | training |", "|---" * (len(INTERVALS) + 3) + "|"]
    for run in report["runs"]:
        cells = [f"{run[f'accuracy {i}']:.3f}" + (f" ({run[f'auc {i}']:.3f})" if run["loss"] == "ce" else "")
                 for i in INTERVALS]
        lines.append(f"| {run['loss']} | " + " | ".join(cells) + f" | {run['accuracy mean']:.3f} | "
                     f"{run['seconds'] / 60:.1f} min |")
    lines += commands(report["runs"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", help="base generator export (its first blocks are the trunk; required "
                                            "unless --smoke, which makes a random one)")
    parser.add_argument("--losses", nargs="+", default=["ce", "bt"], choices=["ce", "bt"])
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny sets: checks the script only")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/results; smoke: a temporary one)")
    args = parser.parse_args()
    if args.generator is None and not args.smoke:
        parser.error("--generator is required (e.g. assets/synthetic/base, from runners/synthetic.py bootstrap)")
    with tempfile.TemporaryDirectory(prefix="pavrm_accuracy-") as work:
        if args.generator is None:
            args.generator = str(smoke_models(Path(work))[0])
        runs = [{"loss": loss, **train(args.generator, loss, Path(work) / loss,
                                       PER_LOSS[loss] + (SMOKE if args.smoke else []))}
                for loss in args.losses]
    report = {**machine(), "smoke": args.smoke, "generator": args.generator, "recipe": RECIPE, "runs": runs}
    write_report("pavrm_accuracy", report, markdown(report), args.out, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
