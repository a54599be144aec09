"""Generation during training: fixed prompts and seeds sampled with the run's chain (`sampling.*`) before the first
step and every `train.eval_every` steps, scored by the frozen reward model and, where the data source has one, by
its judge (the synthetic benchmark's).

    evaluation = SampleEvaluation(run_config, validation_prompts(run_config, dit_config), reward_model, run_dir)
    trainer.fit(step, evaluate=evaluation)        # logs val/reward_mean, val/reward_std (+ val/pass_rate ...)

Every rank samples the same videos through the training engine (ZeRO-3 gathers one layer's parameters at a time,
never the whole model); rank 0 writes them to `<run>/samples/step_NNNNNN/`: NNNNN.safetensors (`latents`, prompt and
seed in the metadata), NNNNN.mp4 when `eval.vae` names a Wan2.1 VAE, and index.jsonl with each video's reward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.atomic import atomic_file, atomic_write_text
from engine.config import RunConfig
from engine.data.datasets import Prompts, ValidationPrompt, data_source
from engine.data.video import write_mp4
from engine.model.dit import DiTConfig
from engine.model.encoders import VAE
from engine.model.sampling import sample_videos


def validation_prompts(config: RunConfig, model: DiTConfig, count: int | None = None) -> Prompts:
    """The fixed prompts and seeds of a run's evaluation (`count`, default `eval.samples`) and their latent grid
    (f, h, w), as the data source gives them: the first samples of `data.val_list_file` (or of `data.list_file`),
    random prompts for `data.source: random`, held-out pairs of the synthetic benchmark."""
    return data_source(config.data).prompts(config.data, model, count or config.eval.samples, config.eval.seed)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95% by default): honest near 0 and 1 and on small samples."""
    if n == 0:
        return math.nan, math.nan
    rate = successes / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def conditions(prompts: list[ValidationPrompt]) -> dict[str, list[torch.Tensor] | None]:
    """The i2v conditions of a batch of prompts as sample_videos takes them (None for t2v)."""
    return {"clip_fea": None if prompts[0].clip_fea is None else [p.clip_fea for p in prompts],
            "y": None if prompts[0].y is None else [p.y for p in prompts]}


class SampleEvaluation:
    """The evaluation hook of `Trainer.fit` for generators; see the module docstring."""

    def __init__(self, config: RunConfig, prompts: Prompts, reward_model: torch.nn.Module | None,
                 run_dir: str | Path, null_context: torch.Tensor,
                 folder: str = "samples") -> None:
        self.config, (self.prompts, self.shape) = config, prompts
        self.reward_model, self.null_context = reward_model, null_context
        self.folder = Path(run_dir) / folder  # the videos of step N go to <folder>/step_N
        self.judge = data_source(config.data).judge
        self.vae = None
        if config.eval.vae:
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
        if self.judge is not None:
            metrics.update({f"val/{key}": value for key, value in self.judge(latents, self.prompts).items()})
        if trainer.is_main:
            self.write(self.folder / f"step_{trainer.step:06d}", latents, rewards)
        return metrics

    def write(self, folder: Path, latents: torch.Tensor, rewards: torch.Tensor | None) -> None:
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
