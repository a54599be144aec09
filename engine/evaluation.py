"""Generation during training: fixed prompts and seeds sampled with the run's chain (`sampling.*`) before the first
step and every `train.eval_every` steps, scored by the frozen reward model and, on the synthetic benchmark, by its
judge.

    evaluation = SampleEvaluation(run_config, validation_prompts(run_config, dit_config), reward_model, run_dir)
    trainer.fit(step, evaluate=evaluation)        # logs val/reward_mean, val/reward_std (+ val/pass_rate ...)

    report = HeldOutReport(run_config, dit_config, reward_model, run_dir, null_context)   # synthetic data only
    report.measure(trainer, "before"); trainer.fit(step); report.finish(trainer)          # -> <run>/summary.json

Every rank samples the same videos through the training engine (ZeRO-3 gathers one layer's parameters at a time,
never the whole model); rank 0 writes them to `<run>/samples/step_NNNNNN/`: NNNNN.safetensors (`latents`, prompt and
seed in the metadata), NNNNN.mp4 when `eval.vae` names a Wan2.1 VAE, and index.jsonl with each video's reward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.atomic import atomic_file, atomic_write_text
from engine.config import RunConfig
from engine.dit import DiTConfig
from engine.generate import sample_videos


@dataclass
class ValidationPrompt:
    context: torch.Tensor  # [L, text_dim]
    prompt: str | None  # the text, when the data carries it
    seed: int  # noise seed of the video
    clip_fea: torch.Tensor | None = None  # i2v: the conditioning image's CLIP features [257, clip_dim]
    y: torch.Tensor | None = None  # i2v: its first-frame condition [in_dim - C, f, h, w]


def validation_prompts(config: RunConfig, model: DiTConfig, count: int | None = None
                       ) -> tuple[list[ValidationPrompt], tuple[int, int, int]]:
    """The fixed prompts and seeds of a run's evaluation (`count`, default `eval.samples`) and their latent grid
    (f, h, w): held-out (prompt, seed) pairs of the synthetic benchmark, the first samples of `data.val_list_file`
    (or of `data.list_file`), or random prompts for `data.source: random`."""
    count, seed = count or config.eval.samples, config.eval.seed
    data = config.data
    if data.source == "synthetic":
        from engine.synthetic import SHAPE, encode_prompt, first_frame_inputs, held_out_pairs

        # the first-frame variant conditions each pair on the first frame of its rendered smooth video
        condition = (lambda p, s: first_frame_inputs(p, "smooth", s)) if model.model_type == "i2v" else \
            (lambda p, s: {})
        return [ValidationPrompt(encode_prompt(p), p, s, **condition(p, s)) for p, s in held_out_pairs(count, seed)], \
            SHAPE
    from engine.data import LatentListDataset, build_dataset

    if data.source == "list":
        dataset = LatentListDataset(data.val_list_file or data.list_file, latent_channels=model.out_dim)
        prompts = [meta.get("prompt") for meta in dataset.metas]
    else:
        dataset = build_dataset(data, model, seed)
        prompts = [None] * len(dataset)
    samples = [dataset[i % len(dataset)] for i in range(count)]
    shape = tuple(samples[0]["latents"].shape[1:])
    return [ValidationPrompt(s["context"], prompts[i % len(dataset)], seed + i, s.get("clip_fea"), s.get("y"))
            for i, s in enumerate(samples)], shape


def conditions(prompts: list[ValidationPrompt]) -> dict[str, list[torch.Tensor] | None]:
    """The i2v conditions of a batch of prompts as sample_videos takes them (None for t2v)."""
    return {"clip_fea": None if prompts[0].clip_fea is None else [p.clip_fea for p in prompts],
            "y": None if prompts[0].y is None else [p.y for p in prompts]}


class SampleEvaluation:
    """The evaluation hook of `Trainer.fit` for generators; see the module docstring."""

    def __init__(self, config: RunConfig, prompts: tuple[list[ValidationPrompt], tuple[int, int, int]],
                 reward_model: torch.nn.Module | None, run_dir: str | Path, null_context: torch.Tensor,
                 folder: str = "samples") -> None:
        self.config, (self.prompts, self.shape) = config, prompts
        self.reward_model, self.null_context = reward_model, null_context
        self.folder = Path(run_dir) / folder  # the videos of step N go to <folder>/step_N
        self.vae = None
        if config.eval.vae:
            from engine.encoders import VAE

            self.vae = VAE.from_pretrained(config.eval.vae)

    @torch.no_grad()
    def sample(self, model) -> torch.Tensor:
        """Latents [N, C, f, h, w] (CPU, fp32) of every validation prompt, in batches of `eval.batch_size`."""
        sampling, size = self.config.sampling, self.config.eval.batch_size
        return torch.cat([sample_videos(model, [p.context for p in chunk], [p.seed for p in chunk], self.shape,
                                        self.null_context, steps=sampling.steps, solver=sampling.solver,
                                        shift=sampling.shift, guidance_scale=sampling.guidance_scale,
                                        **conditions(chunk))
                          for chunk in (self.prompts[i:i + size] for i in range(0, len(self.prompts), size))])

    @torch.no_grad()
    def rewards(self, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The reward model's logits [N] of the clean latents (t = 0)."""
        dtype = next(self.reward_model.parameters()).dtype
        size, logits = self.config.eval.batch_size, []
        for start in range(0, len(latents), size):
            chunk = self.prompts[start:start + size]
            context = torch.nn.utils.rnn.pad_sequence([p.context for p in chunk], batch_first=True)
            x = latents[start:start + size].to(device, dtype)
            condition = {k: None if v is None else torch.stack(v).to(device, dtype) for k, v in conditions(chunk).items()}
            logits.append(self.reward_model(x, torch.zeros(len(x), device=device), context.to(device, dtype),
                                            **condition).float())
        return torch.cat(logits).cpu()

    def __call__(self, trainer) -> dict[str, float]:
        trainer.engine.eval()
        latents = self.sample(trainer.engine)
        metrics, rewards = {}, None
        if self.reward_model is not None:
            rewards = self.rewards(latents, trainer.device)
            metrics.update({"val/reward_mean": rewards.mean().item(), "val/reward_std": rewards.std().item(),
                            "val/reward_prob_mean": rewards.sigmoid().mean().item()})
        if self.config.data.source == "synthetic":
            from engine.synthetic import condition_frame, judge, summarize

            prompts = [p.prompt for p in self.prompts]
            summary = summarize([judge(video, p.prompt, None if p.y is None else condition_frame(p.y))
                                 for video, p in zip(latents, self.prompts)], prompts)
            metrics.update({f"val/{key}": value for key, value in summary.items() if key != "samples"})
        if trainer.is_main:
            self.write(self.folder / f"step_{trainer.step:06d}", latents, rewards)
        return metrics

    def write(self, folder: Path, latents: torch.Tensor, rewards: torch.Tensor | None) -> None:
        from engine.video import write_mp4

        folder.mkdir(parents=True, exist_ok=True)
        index = []
        for i, (prompt, video) in enumerate(zip(self.prompts, latents)):
            record = {"file": f"{i:05d}.safetensors", "prompt": prompt.prompt, "seed": prompt.seed}
            if rewards is not None:
                record["reward_logit"] = rewards[i].item()
            with atomic_file(folder / record["file"]) as staging:
                save_file({"latents": video.contiguous()}, staging,
                          metadata={k: str(v) for k, v in record.items() if k != "file" and v is not None})
            if self.vae is not None:
                record["video"] = write_mp4(folder / f"{i:05d}.mp4", self.vae.decode(video), self.config.eval.fps).name
            index.append(record)
        atomic_write_text(folder / "index.jsonl", "".join(json.dumps(r) + "\n" for r in index))


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
