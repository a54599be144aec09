"""Does the PAVRM judge a generator's own videos the way it judges the rendered ones it learned from? The check for
reward hacking on the synthetic motion benchmark.

    python -m benchmarks.pavrm_shift --generator base=assets/synthetic/base \
        --generator prfl=outputs/prfl-synthetic/checkpoints/step_000100/model        # 2 cores: under a minute
    python -m benchmarks.pavrm_shift --smoke     # random models, a few pairs: checks the script

The PAVRM scores clean latents (sigma 0) of the held-out (prompt, seed) pairs:
- rendered smooth paths at fixed speeds, from standing still to the data's (SPEED, latent pixels per frame); the
  judge's distance threshold is MIN_DISPLACEMENT over the clip, about 0.42 px per frame;
- each named generator's samples on the same pairs (the PRFL recipe's chain: 10 UniPC steps), judged: pass rate,
  median distance travelled, the PAVRM's median logit on passed and failed samples, the ROC-AUC of the logit
  against the judge's verdict (0.5: no better than chance), and the share of samples that score above the median
  rendered smooth video at the data's top speed; and that ROC-AUC again with the samples noised to one sigma in each
  of the validation's five intervals, as PRFL's reward sees x_{k+1} (the PAVRM measured where it is used).

A PAVRM that ranks speeds correctly on rendered videos but scores a generator's failed samples above the real thing
is being hacked: PRFL against it optimises something other than what the judge passes.
Writes benchmarks/results/pavrm_shift-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.cpu_report import cell, machine, smoke_models, write_report
from engine.model.flow import add_noise, timestep_from_sigma
from engine.model.reward import RewardModel
from engine.model.weights import load_dit
from engine.steps.reward import INTERVALS, interval_name, roc_auc
from engine.synthetic.dataset import generate, held_out_pairs
from engine.synthetic.judge import MIN_DISPLACEMENT, judge, summarize
from engine.synthetic.scene import SHAPE, SPEED, encode_prompt, render

SPEEDS = (0.0, 0.15, 0.3, 0.45, 0.6, SPEED[1])


@torch.no_grad()
def logits(reward_model: RewardModel, latents: torch.Tensor, prompts: list[str], sigma: torch.Tensor | None = None,
           batch_size: int = 64) -> torch.Tensor:
    """The PAVRM's logit [N] for latents [N, 16, F, H, W], clean or noised to `sigma` [N] (seeded noise)."""
    sigma = torch.zeros(len(latents)) if sigma is None else sigma
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    scores = []
    for start in range(0, len(latents), batch_size):
        end = start + batch_size
        context = torch.stack([encode_prompt(p) for p in prompts[start:end]])
        x = add_noise(latents[start:end], noise[start:end], sigma[start:end])
        scores.append(reward_model(x, timestep_from_sigma(sigma[start:end]), context).float())
    return torch.cat(scores)


def auc_by_sigma(reward_model: RewardModel, videos: torch.Tensor, prompts: list[str], passed: torch.Tensor) -> dict:
    """ROC-AUC of the logit against the judge's verdict with each video noised to one sigma drawn in each of the
    validation's five intervals (fixed seed), as PRFL's reward sees x_{k+1}; None without both verdicts."""
    if not 0 < passed.sum() < len(passed):
        return {interval_name(i): None for i in INTERVALS}
    g = torch.Generator().manual_seed(1)
    return {interval_name((lo, hi)): roc_auc(logits(reward_model, videos, prompts,
                                                    hi - (hi - lo) * torch.rand(len(videos), generator=g)),
                                             passed.float())
            for lo, hi in INTERVALS}


def median(values: torch.Tensor) -> float | None:
    """Median of the logits; None where there are none (e.g. no sample passed)."""
    return values.median().item() if len(values) else None


def rendered_speeds(reward_model: RewardModel, pairs: list[tuple[str, int]]) -> list[dict]:
    prompts = [prompt for prompt, _ in pairs]
    rows = []
    for speed in SPEEDS:
        videos = torch.stack([render(prompt, "smooth", seed, speed=speed) for prompt, seed in pairs])
        rows.append({"speed_px_per_frame": speed, "distance_px": speed * (SHAPE[0] - 1),
                     "median_logit": median(logits(reward_model, videos, prompts))})
    return rows


def generator_row(name: str, path: Path, reward_model: RewardModel, pairs: list[tuple[str, int]], steps: int,
                  smooth_median: float) -> dict:
    prompts = [prompt for prompt, _ in pairs]
    videos = generate(load_dit(path).eval(), pairs, steps=steps)
    verdicts = [judge(video, prompt) for video, prompt in zip(videos, prompts)]
    scores = logits(reward_model, videos, prompts)
    passed = torch.tensor([v.passed for v in verdicts])
    judged = summarize(verdicts, prompts)
    distance = judged["median_displacement_px"]  # nan where no sample was tracked: null in the JSON
    return {"name": name, "path": str(path), "pass_rate": judged["pass_rate"],
            "median_distance_px": None if math.isnan(distance) else distance,
            "median_logit_passed": median(scores[passed]),
            "median_logit_failed": median(scores[~passed]),
            "auc": roc_auc(scores, passed.float()) if 0 < passed.sum() < len(passed) else None,
            "auc_by_sigma": auc_by_sigma(reward_model, videos, prompts, passed),
            "above_rendered_smooth": (scores > smooth_median).float().mean().item()}


def markdown(report: dict) -> str:
    lines = [f"# The PAVRM on rendered and generated videos (synthetic benchmark, {report['device']}, "
             f"{report['threads']} threads)", "",
             f"`{report['reward']}` scores clean latents of {report['pairs']} held-out (prompt, seed) pairs. The judge "
             f"passes a path of at least {MIN_DISPLACEMENT} px over the clip.", "",
             "Rendered smooth paths at fixed speeds:", "", "| px per frame | distance (px) | median logit |",
             "|---|---|---|"]
    lines += [f"| {r['speed_px_per_frame']:.2f} | {r['distance_px']:.2f} | {cell(r['median_logit'])} |"
              for r in report["rendered"]]
    lines += ["", f"Generators' samples ({report['steps']} UniPC steps), judged; AUC: the logit against the judge's "
              "verdict; above smooth: share scoring above the median rendered smooth video at "
              f"{SPEEDS[-1]} px per frame:", "",
              "| generator | pass | median distance (px) | median logit, passed | median logit, failed | AUC | "
              "above smooth |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['name']} | {g['pass_rate']:.2f} | {cell(g['median_distance_px'])} | "
              f"{cell(g['median_logit_passed'])} | {cell(g['median_logit_failed'])} | {cell(g['auc'])} | "
              f"{g['above_rendered_smooth']:.2f} |" for g in report["generators"]]
    names = list(report["generators"][0]["auc_by_sigma"]) if report["generators"] else []
    lines += ["", "ROC-AUC of the logit against the judge's verdict within each generator's samples, noised to a sigma "
              "in each interval (one draw per sample and interval):", "",
              "| generator | " + " | ".join(f"sigma {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {g['name']} | " + " | ".join(cell(g["auc_by_sigma"][n]) for n in names) + " |"
              for g in report["generators"]]
    lines += ["", "Command (from the repository root):", "", f"    python {report['command']}"]
    return "\n".join(lines) + "\n"


def named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH, e.g. base=assets/synthetic/base")
    return name, Path(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", type=Path, help="PAVRM folder (default: assets/synthetic/pavrm)")
    parser.add_argument("--generator", type=named_path, action="append", metavar="NAME=PATH",
                        help="a generator export to sample and judge (repeatable; required unless --smoke, which "
                             "judges a random generator twice, as base and repeat: their figures must agree)")
    parser.add_argument("--pairs", type=int, default=64, help="held-out (prompt, seed) pairs")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (the PRFL recipe's chain)")
    parser.add_argument("--smoke", action="store_true", help="4 pairs, 2 steps: checks the script only")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/results; smoke: a temporary one)")
    parser.add_argument("--name", default="pavrm_shift", help="report name: <out>/<name>-cpu.json and .md")
    args = parser.parse_args()
    if args.smoke and args.generator is None and args.reward is None:
        base, args.reward = smoke_models(Path(tempfile.mkdtemp(prefix="pavrm_shift-")))
        args.generator = [("base", base), ("repeat", base)]
    if not args.generator:
        parser.error("--generator NAME=PATH is required, e.g. base=assets/synthetic/base")
    args.reward = args.reward or Path("assets/synthetic/pavrm")
    for flag, folder in (("--reward", args.reward), *((f"--generator {n}", p) for n, p in args.generator)):
        if not folder.is_dir():
            sys.exit(f"error: {flag}: {folder} is not a folder (python runners/synthetic.py bootstrap writes the "
                     "base generator and its PAVRM; runners/prfl.py exports under <run>/checkpoints/step_N/model)")
    pairs_count, steps = (4, 2) if args.smoke else (args.pairs, args.steps)
    torch.manual_seed(0)
    reward_model = RewardModel.from_pretrained(args.reward).eval()
    pairs = held_out_pairs(pairs_count)
    rendered = rendered_speeds(reward_model, pairs)
    smooth_median = rendered[-1]["median_logit"]
    report = {**machine(), "smoke": args.smoke, "reward": str(args.reward), "pairs": pairs_count, "steps": steps,
              "rendered": rendered,
              "generators": [generator_row(name, path, reward_model, pairs, steps, smooth_median)
                             for name, path in args.generator],
              "command": " ".join(["-m benchmarks.pavrm_shift", *sys.argv[1:]])}
    write_report(args.name, report, markdown(report), args.out, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
