"""Training the PAVRM: noise-level sampling, the CE and Bradley-Terry steps and the paper's validation protocol.
What is trained (the reward model in the DeepSpeed engine, its head at its own learning rate) is
engine.train.specs.RewardSpec.

    spec = RewardSpec(run_config); trainer = Trainer(run_config, ds_config, spec)
    trainer.fit(RewardStep(run_config.reward),
                evaluate=RewardValidation(run_config, spec.validation_dataset(trainer.transformer.config)))
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.atomic import atomic_write_text
from engine.config import RewardConfig, RunConfig
from engine.data.datasets import collate
from engine.distributed.process import log
from engine.model.flow import NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma, timestep_from_sigma, training_sigmas
from engine.train.randomness import SampleRandomness

# The paper's evaluation intervals of sigma: [0, 0.2], (0.2, 0.4], ..., (0.8, 1.0].
INTERVALS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def reward_sigmas(u: torch.Tensor, config: RewardConfig) -> torch.Tensor:
    """Training noise levels from uniform draws u in [0, 1) (see RewardConfig.timesteps)."""
    if config.timesteps == "uniform":
        return u
    if config.timesteps == "shifted_index":
        index = (u * NUM_TRAIN_TIMESTEPS).floor()
        return shift_sigma(1 - index / NUM_TRAIN_TIMESTEPS, config.shift)
    if config.timesteps == "logit_normal":
        return training_sigmas(u, "logit_normal")
    choices = torch.tensor(config.fixed_sigmas, dtype=u.dtype, device=u.device)
    return choices[(u * len(choices)).long().clamp_max(len(choices) - 1)]


def score(model, batch: dict[str, torch.Tensor], noise: torch.Tensor, sigma: torch.Tensor,
          prefix: str = "") -> torch.Tensor:
    """Logits [B] of the clean latents `batch[prefix + "latents"]` noised to `sigma` [B] with `noise`."""
    x0 = batch[prefix + "latents"]
    return model(add_noise(x0, noise, sigma), timestep_from_sigma(sigma), batch[prefix + "context"],
                 clip_fea=batch.get(prefix + "clip_fea"), y=batch.get(prefix + "y"))


# ---------------------------------------------------------------------------------------------------------------
# The training step


class RewardStep:
    """CE: binary cross-entropy on the label `task`; BT: -log sigmoid(r_preferred - r_rejected) on pairs that share
    noise and timestep. Both in fp32 from the logits."""

    name = "pavrm"

    def __init__(self, config: RewardConfig) -> None:
        self.config = config

    def sigma_scale(self, step: int) -> float:
        """The curriculum's factor on the training sigmas at optimizer step `step` (0-based)."""
        if not self.config.sigma_warmup_steps:
            return 1.0
        return min(1.0, (step + 1) / self.config.sigma_warmup_steps)

    def __call__(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness):
        x0 = batch["latents"]
        noise = rng.randn(*x0.shape[1:]).to(x0)
        sigma = reward_sigmas(rng.rand(), self.config).view(-1).to(x0.device) * self.sigma_scale(rng.step)
        if self.config.loss == "ce":
            logits = score(model, batch, noise, sigma).float()
            labels = batch[self.config.task].float()
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            accuracy = ((logits > 0) == (labels > 0.5)).float().mean()
        else:  # one forward for both halves of the pairs
            both = {key: torch.cat([batch[key], batch[f"rejected_{key}"]])
                    for key in ("latents", "context", "clip_fea", "y") if key in batch}
            logits = score(model, both, torch.cat([noise, noise]), torch.cat([sigma, sigma])).float()
            preferred, rejected = logits.chunk(2)
            loss = -F.logsigmoid(preferred - rejected).mean()
            accuracy = (preferred > rejected).float().mean()
        return loss, {"loss/pavrm": loss.detach(), "train/accuracy": accuracy, "train/logit_mean": logits.mean()}


# ---------------------------------------------------------------------------------------------------------------
# Validation


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (NaN without both classes)."""
    positive, negative = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(positive) or not len(negative):
        return math.nan
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def interval_name(interval: tuple[float, float]) -> str:
    lo, hi = interval
    return f"{'[' if lo == 0 else '('}{lo:.1f},{hi:.1f}]"


class RewardValidation:
    """The paper's protocol: per held-out sample one random sigma in each of the five intervals (fixed seed),
    a prediction is right when the logit is > 0 for a positive label (CE) or the preferred sample scores higher
    (BT). Reports per-interval accuracy, their mean, and ROC-AUC per interval and over all; to the console,
    tensorboard (through the trainer's log) and `<run>/validation.jsonl` + `<run>/validation.json` (latest)."""

    def __init__(self, config: RunConfig, dataset, run_dir: str | Path | None = None) -> None:
        self.config, self.dataset = config, dataset
        self.run_dir = Path(run_dir or config.output_dir)

    def _draws(self, index: int, interval: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.config.reward.eval_seed * 1_000_003 + index * 8 + interval)
        lo, hi = INTERVALS[interval]
        sigma = hi - (hi - lo) * torch.rand(1, generator=g)  # in (lo, hi]
        return torch.randn(shape, generator=g), sigma

    @torch.no_grad()
    def logits(self, model, device, layout, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[intervals, N] logits and [N] labels; BT: [intervals, 2N] logits of the preferred then the rejected
        samples, labelled 1 and 0."""
        n, pairs = len(self.dataset), self.config.reward.loss == "bt"
        # Data-parallel groups split the samples; every rank runs the same number of forwards (ZeRO-3 gathers
        # parameters collectively), the last ones padded with repeats that are dropped.
        per_rank = -(-n // layout.dp_size)
        mine = [min(layout.dp_rank * per_rank + i, n - 1) for i in range(per_rank)]
        rows = []
        for interval in range(len(INTERVALS)):
            chunks = []
            for start in range(0, per_rank, micro_batch):
                indices = mine[start:start + micro_batch]
                batch = {k: v.to(device) for k, v in collate([self.dataset[i] for i in indices]).items()}
                draws = [self._draws(i, interval, batch["latents"].shape[1:]) for i in indices]
                noise = torch.stack([d[0] for d in draws]).to(batch["latents"])
                sigma = torch.cat([d[1] for d in draws]).to(device)
                if pairs:
                    chunks.append(torch.stack([score(model, batch, noise, sigma),
                                               score(model, batch, noise, sigma, prefix="rejected_")], dim=1))
                else:
                    chunks.append(torch.stack([score(model, batch, noise, sigma),
                                               batch[self.config.reward.task].to(device)], dim=1))
            rows.append(torch.cat(chunks).float())  # [per_rank, 2]
        local = torch.stack(rows)  # [intervals, per_rank, 2]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            # Ranks of one sequence-parallel group hold the same rows: keep the first of each group.
            local = torch.cat(parts[::layout.sp_size], dim=1)
        local = local[:, :n].cpu()
        if pairs:
            return local.transpose(1, 2).flatten(1), torch.cat([torch.ones(n), torch.zeros(n)])
        return local[..., 0], local[0, :, 1]

    def summarize(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        metrics = {}
        pairs = self.config.reward.loss == "bt"
        for row, interval in zip(logits, INTERVALS):
            name = interval_name(interval)
            if pairs:
                preferred, rejected = row.chunk(2)
                metrics[f"val/accuracy {name}"] = (preferred > rejected).float().mean().item()
            else:
                metrics[f"val/accuracy {name}"] = ((row > 0) == (labels > 0.5)).float().mean().item()
            metrics[f"val/auc {name}"] = roc_auc(row, labels)
        metrics["val/accuracy mean"] = sum(metrics[f"val/accuracy {interval_name(i)}"] for i in INTERVALS) / 5
        metrics["val/auc all"] = roc_auc(logits.flatten(), labels.repeat(len(INTERVALS)))
        return metrics

    def __call__(self, trainer) -> dict[str, float]:
        trainer.engine.eval()
        logits, labels = self.logits(trainer.engine, trainer.device, trainer.layout,
                                     self.config.train.micro_batch_size)
        metrics = self.summarize(logits, labels)
        if trainer.is_main:
            record = {"step": trainer.step, "samples": len(self.dataset), "loss": self.config.reward.loss,
                      "task": self.config.reward.task, **{k.removeprefix("val/"): v for k, v in metrics.items()}}
            with open(self.run_dir / "validation.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            atomic_write_text(self.run_dir / "validation.json", json.dumps(record, indent=2))
            log(format_table(record))
        return metrics


def format_table(record: dict) -> str:
    names = [interval_name(i) for i in INTERVALS]
    head = "| sigma | " + " | ".join(names) + " | mean |"
    accuracy = "| accuracy | " + " | ".join(f"{record[f'accuracy {n}']:.3f}" for n in names) + \
        f" | {record['accuracy mean']:.3f} |"
    auc = "| ROC-AUC | " + " | ".join(f"{record[f'auc {n}']:.3f}" for n in names) + f" | {record['auc all']:.3f} |"
    return (f"validation at step {record['step']} ({record['samples']} samples, {record['loss']}, "
            f"{record['task']}):\n{head}\n|---|" + "---|" * 6 + f"\n{accuracy}\n{auc}")
