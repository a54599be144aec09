"""What a run trains and exports, handed to the Trainer as the step is: the generator (a DiT, LoRA adapters on it
when `lora.rank` is set) or a PAVRM (its trunk's chosen blocks at train.lr, its head at reward.head_lr, all in one
DeepSpeed engine, so the head is the same on every data-parallel rank and clipped with the rest).

    trainer = Trainer(run_config, ds_config, RewardSpec(run_config))
    dry_run(run_config, ds_config, RewardSpec(run_config))        # the same model, on the meta device

A checkpoint records what `export` needs (`spec.checkpoint_info(model)`), so the trainer's exports and
runners/convert.py write a checkpoint's weights through the same function.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Protocol

import torch

from engine.config import RunConfig
from engine.data.datasets import build_dataset
from engine.data.pairs import labelled_dataset, validation_dataset
from engine.errors import ConfigError
from engine.model.dit import DiT, DiTConfig
from engine.model.lora import LoRAConfig, add_lora, merged_state, save_lora_export
from engine.model.reward import RewardModel, RewardModelConfig, save_reward_state
from engine.model.weights import load_dit, read_config, save_dit_state


class ModelSpec(Protocol):
    name: str  # what the checkpoint's export holds: "generator" or "reward"
    forwards_per_sample: int  # evaluations with gradients per sample (the dry run's activation estimate)

    def build(self, dtype: torch.dtype) -> torch.nn.Module:
        """The model to train, weights loaded or initialised, `requires_grad` set on what trains."""

    def meta_model(self) -> torch.nn.Module:
        """The same architecture on the meta device, from configs only (the dry run)."""

    def transformer(self, model: torch.nn.Module) -> DiT:
        """The DiT inside the model: sequence parallelism and activation checkpointing apply to it."""

    def parameter_groups(self, model: torch.nn.Module) -> list:
        """What the optimizer updates (parameters, or param-group dicts with their own `lr`)."""

    def dataset(self, dit_config: DiTConfig) -> torch.utils.data.Dataset:
        """The training data."""

    def checkpoint_info(self, model: torch.nn.Module) -> dict:
        """Plain data saved in every checkpoint, from which `export` writes its weights."""

    def describe(self, model: torch.nn.Module, dataset) -> dict:
        """What the dry run reports beyond the engine's estimate."""


def _runtime(config: RunConfig) -> dict:
    return {"attention_backend": config.model.attention_backend, "kernel_backend": config.model.kernel_backend}


def generator_config(config: RunConfig) -> DiTConfig:
    """The generator's architecture: from `model.path`'s config, else the preset."""
    return read_config(config.model.path) if config.model.path else DiTConfig.preset(config.model.preset)


class GeneratorSpec:
    """The run's DiT trains (all of it, or LoRA adapters on it); checkpoints export it (LoRA: merged + adapters)."""

    name = "generator"
    forwards_per_sample = 1

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def build(self, dtype: torch.dtype) -> DiT:
        cfg = self.config.model
        if cfg.path:
            model = load_dit(cfg.path, dtype=dtype, **_runtime(self.config))
        else:
            model = DiT(DiTConfig.preset(cfg.preset, **_runtime(self.config))).to(dtype)
        if self.config.lora.rank:
            add_lora(model, self.config.lora)
        return model

    def meta_model(self) -> DiT:
        with torch.device("meta"):
            return DiT(generator_config(self.config))

    def transformer(self, model: DiT) -> DiT:
        return model

    def parameter_groups(self, model: DiT) -> list:
        return [p for p in model.parameters() if p.requires_grad]

    def dataset(self, dit_config: DiTConfig):
        return build_dataset(self.config.data, dit_config, self.config.seed)

    def checkpoint_info(self, model: DiT) -> dict:
        return {"trained": self.name, "dit_config": model.config.to_dict(),
                "lora": dataclasses.asdict(self.config.lora)}

    def describe(self, model: DiT, dataset) -> dict:
        return {}


class RewardSpec:
    """A PAVRM trains: from `reward.path`, else from the first `reward.model.blocks` blocks of `model.path` (or of
    the preset); checkpoints export reward model folders (`RewardModel.from_pretrained`)."""

    name = "reward"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.forwards_per_sample = 2 if config.reward.loss == "bt" else 1  # BT scores both videos of a pair

    def build(self, dtype: torch.dtype) -> RewardModel:
        cfg = self.config
        if cfg.reward.path:
            model = RewardModel.from_pretrained(cfg.reward.path, dtype=dtype, **_runtime(cfg))
        elif cfg.model.path:
            model = RewardModel.from_generator(cfg.model.path, cfg.reward.model, dtype=dtype, **_runtime(cfg))
        else:
            trunk = DiT(DiTConfig.preset(cfg.model.preset, num_layers=cfg.reward.model.blocks, **_runtime(cfg)))
            model = RewardModel(cfg.reward.model, trunk).to(dtype)
        model.trainable_parameters(cfg.reward.trainable_blocks)
        return model

    def meta_model(self) -> RewardModel:
        reward = self.config.reward
        if reward.path:
            reward_config = RewardModelConfig(**json.loads((Path(reward.path) / "reward_config.json").read_text()))
            trunk_config = read_config(Path(reward.path) / "trunk")
        else:
            reward_config, generator = reward.model, generator_config(self.config)
            if reward_config.blocks > generator.num_layers:
                raise ConfigError(f"reward.model.blocks={reward_config.blocks}: the generator has only "
                                  f"{generator.num_layers} blocks")
            trunk_config = dataclasses.replace(generator, num_layers=reward_config.blocks)
        with torch.device("meta"):
            return RewardModel(reward_config, DiT(trunk_config))

    def transformer(self, model: RewardModel) -> DiT:
        return model.trunk

    def parameter_groups(self, model: RewardModel) -> list:
        trunk, head = model.trainable_parameters(self.config.reward.trainable_blocks)
        return [{"params": trunk, "lr": self.config.train.lr}, {"params": head, "lr": self.config.reward.head_lr}]

    def dataset(self, dit_config: DiTConfig):
        return labelled_dataset(self.config, self.config.data, dit_config, self.config.seed)

    def validation_dataset(self, dit_config: DiTConfig):
        return validation_dataset(self.config, dit_config)

    def checkpoint_info(self, model: RewardModel) -> dict:
        return {"trained": self.name, "dit_config": model.trunk.config.to_dict(),
                "reward_config": dataclasses.asdict(model.config)}

    def describe(self, model: RewardModel, dataset) -> dict:
        trunk, head = model.trainable_parameters(self.config.reward.trainable_blocks)
        return {"trunk_blocks": model.config.blocks, "feature_blocks": model.config.feature_blocks,
                "trainable_trunk_parameters": sum(p.numel() for p in trunk),
                "head_parameters": sum(p.numel() for p in head), "loss": self.config.reward.loss,
                "task": self.config.reward.task, "training_samples": len(dataset)}


def export(state: dict[str, torch.Tensor], info: dict, out: Path, lora_out: Path | None = None) -> dict:
    """Write a consolidated state dict as the loadable folder `out`, as a checkpoint's `info` says: a DiT
    (`load_dit`), a LoRA run's merged DiT with its adapters in `lora_out`, or a reward model folder. Returns the
    state `out` holds (LoRA: the merged one), for a caller that verifies the export."""
    dit_config = DiTConfig(**info["dit_config"])
    if info.get("trained", "generator") == "reward":
        save_reward_state(state, RewardModelConfig(**info["reward_config"]), dit_config, out)
        return state
    lora = LoRAConfig(**info.get("lora", {}))
    if not lora.rank:
        save_dit_state(state, dit_config, out)
        return state
    save_lora_export(state, dit_config, lora, out, lora_out or out.with_name(f"{out.name}-lora"))
    return merged_state(state, lora)
