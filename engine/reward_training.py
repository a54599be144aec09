"""Training the PAVRM: noise-level sampling, the CE and Bradley-Terry steps, preference pairs, the paper's
validation protocol, and the trainer that wraps the reward model in the DeepSpeed engine.

    trainer = RewardTrainer(run_config, ds_config)
    trainer.fit(RewardStep(run_config.reward), evaluate=RewardValidation(run_config, trainer.validation_dataset()))
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.atomic import atomic_write_text
from engine.config import ConfigError, RewardConfig, RunConfig
from engine.data import LABEL_FIELDS, SampleRandomness, build_dataset, collate
from engine.dit import DiT, DiTConfig
from engine.flow import NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma, timestep_from_sigma, training_sigmas
from engine.reward import RewardModel, RewardModelConfig, save_reward_state
from engine.trainer import Trainer, dry_run, log
from engine.weights import read_config

# The paper's evaluation intervals of sigma: [0, 0.2], (0.2, 0.4], ..., (0.8, 1.0].
INTERVALS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))
PAIR_FIELDS = ("pair_id", "preferred")


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
# Preference pairs


class PreferencePairs(torch.utils.data.Dataset):
    """(preferred, rejected) pairs over a dataset: an item is the preferred sample's tensors plus the rejected
    sample's under `rejected_*` keys."""

    def __init__(self, base, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            raise ValueError("no preference pairs in the dataset")
        self.base, self.pairs, self.null_context = base, pairs, base.null_context

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        preferred, rejected = self.pairs[index]
        return {**self.base[preferred], **{f"rejected_{k}": v for k, v in self.base[rejected].items()}}


def pairs_from_metas(dataset) -> list[tuple[int, int]]:
    """Pairs of a list dataset whose metas carry `pair_id` and `preferred`: two samples per pair id, one preferred."""
    groups: dict[str, list[int]] = {}
    for index, meta in enumerate(dataset.metas):
        groups.setdefault(str(meta["pair_id"]), []).append(index)
    pairs = []
    for pair_id, members in groups.items():
        flags = [bool(dataset.metas[i]["preferred"]) for i in members]
        if len(members) != 2 or sum(flags) != 1:
            files = ", ".join(str(dataset.sample_paths[i]) for i in members)
            raise ValueError(f"pair_id {pair_id!r}: expected two samples, one with preferred=true; found "
                             f"{len(members)} with preferred={flags} ({files})")
        pairs.append((members[0], members[1]) if flags[0] else (members[1], members[0]))
    return pairs


def synthetic_pairs(dataset) -> list[tuple[int, int]]:
    """Every bad-motion sample of the synthetic benchmark against the smooth sample of its prompt and round."""
    from engine.synthetic import PROMPTS

    by_key = {}
    for index in range(len(dataset)):
        prompt, motion, _ = dataset.describe(index)
        round_of = index // (len(dataset.motions) * len(PROMPTS))
        by_key.setdefault((round_of, prompt), {}).setdefault(motion, []).append(index)
    pairs = []
    for motions in by_key.values():
        for motion, indices in motions.items():
            if motion != "smooth" and "smooth" in motions:
                pairs += [(motions["smooth"][0], i) for i in indices]
    return pairs


def labelled_dataset(config: RunConfig, data, trunk_config: DiTConfig, seed: int) -> torch.utils.data.Dataset:
    """The data a reward run trains on: samples with the CE task's label, or preference pairs for BT."""
    reward = config.reward
    if data.source == "random":
        raise ConfigError("data.source='random' has no labels; reward model training needs 'synthetic' or 'list' data")
    required = (reward.task,) if reward.loss == "ce" else PAIR_FIELDS
    dataset = build_dataset(data, trunk_config, seed, required_fields=required)
    if reward.loss == "ce":
        if data.source == "synthetic" and reward.task not in LABEL_FIELDS:
            raise ConfigError(f"reward.task={reward.task!r}: the synthetic benchmark labels {', '.join(LABEL_FIELDS)}")
        return dataset
    return PreferencePairs(dataset, synthetic_pairs(dataset) if data.source == "synthetic" else pairs_from_metas(dataset))


def validation_dataset(config: RunConfig, trunk_config: DiTConfig) -> torch.utils.data.Dataset:
    """Held-out data: `data.val_list_file`, or other seeds of the synthetic benchmark."""
    data = config.data
    if data.source == "list":
        if data.val_list_file is None:
            raise ConfigError("data.val_list_file is not set: reward model validation needs held-out samples")
        return labelled_dataset(config, dataclasses.replace(data, list_file=data.val_list_file, val_list_file=None),
                                trunk_config, config.seed)
    # Synthetic samples are rendered from (seed, index): another seed gives held-out videos. Varied looks are a
    # training augmentation: validation scores the benchmark's own renders.
    held_out = dataclasses.replace(data, num_samples=data.val_num_samples, synthetic_varied_looks=False)
    return labelled_dataset(config, held_out, trunk_config, config.seed + 1)


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

    def __call__(self, trainer: Trainer) -> dict[str, float]:
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


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class RewardTrainer(Trainer):
    """The engine's trainer with a reward model in place of the generator: the trunk's blocks train at train.lr,
    the pooling head and MLP at reward.head_lr, all of it inside one DeepSpeed engine (so the head is the same on
    every data-parallel rank and clipped with the rest); checkpoints export reward model folders."""

    def build_model(self) -> RewardModel:
        cfg = self.config
        runtime = {"attention_backend": cfg.model.attention_backend, "kernel_backend": cfg.model.kernel_backend}
        if cfg.reward.path:
            model = RewardModel.from_pretrained(cfg.reward.path, dtype=self.dtype, **runtime)
        elif cfg.model.path:
            model = RewardModel.from_generator(cfg.model.path, cfg.reward.model, dtype=self.dtype, **runtime)
        else:
            trunk = DiT(DiTConfig.preset(cfg.model.preset, num_layers=cfg.reward.model.blocks, **runtime))
            model = RewardModel(cfg.reward.model, trunk).to(self.dtype)
        self._trunk_params, self._head_params = model.trainable_parameters(cfg.reward.trainable_blocks)
        return model

    @property
    def transformer(self) -> DiT:
        return self.model.trunk

    def parameter_groups(self) -> list:
        return [{"params": self._trunk_params, "lr": self.config.train.lr},
                {"params": self._head_params, "lr": self.config.reward.head_lr}]

    def build_dataset(self):
        return labelled_dataset(self.config, self.config.data, self.transformer.config, self.config.seed)

    def validation_dataset(self):
        return validation_dataset(self.config, self.transformer.config)

    def export(self, state: dict[str, torch.Tensor], out: Path) -> None:
        save_reward_state(state, self.model.config, self.transformer.config, out)

    @staticmethod
    def dry_run(config: RunConfig, ds_template: dict) -> dict:
        """Check the configs and the training data against a reward model built on the meta device; report its
        sizes and the memory estimate of `engine.trainer.dry_run`."""
        if config.reward.path:
            reward_config = RewardModelConfig(**json.loads((Path(config.reward.path) / "reward_config.json").read_text()))
            trunk_config = read_config(Path(config.reward.path) / "trunk")
        else:
            reward_config = config.reward.model
            trunk_config = read_config(config.model.path) if config.model.path else DiTConfig.preset(config.model.preset)
            if reward_config.blocks > trunk_config.num_layers:
                raise ConfigError(f"reward.model.blocks={reward_config.blocks}: the generator has only "
                                  f"{trunk_config.num_layers} blocks")
            trunk_config = dataclasses.replace(trunk_config, num_layers=reward_config.blocks)
        with torch.device("meta"):
            model = RewardModel(reward_config, DiT(trunk_config))
        trunk, head = model.trainable_parameters(config.reward.trainable_blocks)
        dataset = labelled_dataset(config, config.data, trunk_config, config.seed)
        report = dry_run(config, ds_template, dataset=dataset, model=model,
                         forwards_per_sample=2 if config.reward.loss == "bt" else 1)
        return {**report, "trunk_blocks": reward_config.blocks, "feature_blocks": reward_config.feature_blocks,
                "trainable_trunk_parameters": sum(p.numel() for p in trunk),
                "head_parameters": sum(p.numel() for p in head), "loss": config.reward.loss,
                "task": config.reward.task, "training_samples": len(dataset)}
