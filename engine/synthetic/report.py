"""What a run changed on the synthetic benchmark: held-out pairs sampled and judged before training and after it.

    report = HeldOutReport(run_config, dit_config, reward_model, run_dir, null_context)
    report.measure(trainer, "before"); trainer.fit(step); report.finish(trainer)          # -> <run>/summary.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.atomic import atomic_write_text
from engine.config import RunConfig
from engine.evaluation import SampleEvaluation, validation_prompts
from engine.model.dit import DiTConfig


class HeldOutReport:
    """Synthetic benchmark: what the run changed. The generator samples `eval.held_out_pairs` held-out (prompt,
    seed) pairs through the engine (as SampleEvaluation does, videos in `<run>/held_out/step_N/`) before training
    and after the last step; the mean reward (the PAVRM logit at t = 0), the judge's pass rate (with its Wilson 95%
    interval) and detected rates, the diversity and the median direction cosine and largest acceleration of both,
    and the diversity ratio after / before go to the console and to `<run>/summary.json`. In the first-frame (i2v)
    variant the pairs are conditioned on their rendered first frames, the summary adds the first-frame adherence
    (with its interval) and the diversity is that of the motion (the condition fixes the start)."""

    KEYS = ("reward_mean", "pass_rate", "pass_rate_ci95_low", "pass_rate_ci95_high", "detected_rate", "tracked_rate",
            "trajectory_spread_px", "motion_spread_px", "median_direction_cosine", "median_max_acceleration_px",
            "first_frame_rate", "first_frame_rate_ci95_low", "first_frame_rate_ci95_high", "median_start_distance_px")

    def __init__(self, config: RunConfig, model: DiTConfig, reward_model: torch.nn.Module | None,
                 run_dir: str | Path, null_context: torch.Tensor) -> None:
        prompts = validation_prompts(config, model, config.eval.held_out_pairs)
        self.evaluation = SampleEvaluation(config, prompts, reward_model, run_dir, null_context, folder="held_out")
        self.path, self.results = Path(run_dir) / "summary.json", {}

    def measure(self, trainer, when: str) -> None:
        """Sample and judge the held-out pairs with the weights the engine holds now (every rank takes part)."""
        metrics = {k.removeprefix("val/"): v for k, v in self.evaluation(trainer).items()}
        # No spread when the judge finds no object: null in the JSON, which strict readers accept and NaN is not.
        values = {k: None if math.isnan(metrics[k]) else metrics[k] for k in self.KEYS if k in metrics}
        self.results[when] = {"step": trainer.step, "samples": len(self.evaluation.prompts), **values}
        if trainer.is_main:
            print(f"held-out {when} (step {trainer.step}, {len(self.evaluation.prompts)} pairs): "
                  + " ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in values.items()), flush=True)

    def finish(self, trainer) -> dict:
        """Measure after training and write summary.json (rank 0); returns the summary."""
        self.measure(trainer, "after")
        diversity = "motion_spread_px" if "first_frame_rate" in self.results["before"] else "trajectory_spread_px"
        before, after = (self.results[w].get(diversity) for w in ("before", "after"))
        summary = {**self.results, "diversity_ratio": after / before if before and after is not None else None}
        if trainer.is_main:
            atomic_write_text(self.path, json.dumps(summary, indent=2) + "\n")
            ratio = summary["diversity_ratio"]
            print(f"diversity after / before: {'n/a' if ratio is None else f'{ratio:.3g}'}; summary in {self.path}",
                  flush=True)
        return summary
