"""The datasets a run config's `data` section names, through a registry of data sources.

A source says how to build its dataset, which labels and preference pairs it holds, what its held-out samples are,
which prompts an evaluation samples and how generated videos are judged. The engine registers `random` (random
latents in memory: tests and smoke runs) and `list` (latents on disk, engine/data/format.py); a plugin registers its
own (engine.synthetic registers `synthetic`), and nothing in the engine branches on a source's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import DataConfig
from engine.data.format import LatentListDataset
from engine.errors import ConfigError
from engine.model.dit import CLIP_TOKENS, DiTConfig
from engine.model.encoders import first_frame_condition


@dataclass
class ValidationPrompt:
    """One video of an evaluation: its text embedding, noise seed and (i2v) image condition."""

    context: torch.Tensor  # [L, text_dim]
    prompt: str | None  # the text, when the data carries it
    seed: int  # noise seed of the video
    clip_fea: torch.Tensor | None = None  # i2v: the conditioning image's CLIP features [257, clip_dim]
    y: torch.Tensor | None = None  # i2v: its first-frame condition [in_dim - C, f, h, w]


Prompts = tuple[list[ValidationPrompt], tuple[int, int, int]]  # the prompts and their latent grid (f, h, w)


@dataclass(frozen=True)
class DataSource:
    """What a `data.source` name means. Hooks take the `data` section and the model's DiTConfig."""

    # (data, model, seed, meta fields every record must have) -> the dataset
    dataset: Callable[[DataConfig, DiTConfig, int, tuple[str, ...]], torch.utils.data.Dataset]
    # (data, model, count, seed) -> the fixed prompts and seeds of an evaluation
    prompts: Callable[[DataConfig, DiTConfig, int, int], Prompts]
    # the label fields every sample carries (None: whatever a record's meta holds, checked per record; (): none)
    labels: tuple[str, ...] | None = None
    # (data, seed) -> the data section and seed of the held-out samples (reward-model validation)
    held_out: Callable[[DataConfig, int], tuple[DataConfig, int]] | None = None
    # dataset -> (preferred, rejected) index pairs; None: from the records' `pair_id` / `preferred` (data/pairs.py)
    pairs: Callable[[torch.utils.data.Dataset], list[tuple[int, int]]] | None = None
    # (generated latents [N, C, f, h, w], their prompts) -> metrics of an analytic judge (None: no judge)
    judge: Callable[[torch.Tensor, list[ValidationPrompt]], dict[str, float]] | None = None


SOURCES: dict[str, DataSource] = {}


def register_source(name: str, source: DataSource) -> None:
    SOURCES[name] = source


def data_source(data: DataConfig) -> DataSource:
    if data.source not in SOURCES:
        raise ConfigError(f"data.source={data.source!r} is not registered (registered: {', '.join(SOURCES)}); "
                          "the synthetic benchmark's source comes with `import engine.synthetic`")
    return SOURCES[data.source]


def build_dataset(data: DataConfig, model: DiTConfig, seed: int, required_fields: tuple[str, ...] = ()):
    """The dataset a run config's `data` section names; `required_fields` must be in every record."""
    return data_source(data).dataset(data, model, seed, required_fields)


def first_samples(dataset, prompts: list[str | None], count: int, seed: int) -> Prompts:
    """An evaluation of the dataset's first `count` samples (cycled), the i-th with noise seed `seed + i`."""
    samples = [dataset[i % len(dataset)] for i in range(count)]
    shape = tuple(samples[0]["latents"].shape[1:])
    return [ValidationPrompt(s["context"], prompts[i % len(dataset)], seed + i, s.get("clip_fea"), s.get("y"))
            for i, s in enumerate(samples)], shape


# ---------------------------------------------------------------------------------------------------------------
# random


class RandomLatents(torch.utils.data.Dataset):
    """An in-memory set of random latents and prompts, deterministic by (seed, index): smoke runs and tests."""

    def __init__(self, model: DiTConfig, num_samples: int, latent_shape: tuple[int, int, int], text_tokens: int,
                 seed: int = 0) -> None:
        self.model, self.num_samples, self.latent_shape = model, num_samples, tuple(latent_shape)
        self.text_tokens, self.seed = text_tokens, seed
        self.null_context = torch.zeros(1, model.text_dim)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        latents = torch.randn(self.model.out_dim, *self.latent_shape, generator=g)
        sample = {"latents": latents, "context": torch.randn(self.text_tokens, self.model.text_dim, generator=g)}
        if self.model.model_type == "i2v":
            sample["clip_fea"] = torch.randn(CLIP_TOKENS, self.model.clip_dim, generator=g)
            sample["y"] = first_frame_condition(latents, self.model.in_dim - latents.shape[0])
        return sample


def _random_prompts(data: DataConfig, model: DiTConfig, count: int, seed: int) -> Prompts:
    dataset = build_dataset(data, model, seed)
    return first_samples(dataset, [None] * len(dataset), count, seed)


register_source("random", DataSource(
    dataset=lambda data, model, seed, _: RandomLatents(model, data.num_samples, data.latent_shape, data.text_tokens,
                                                       seed=seed),
    prompts=_random_prompts, labels=()))


# ---------------------------------------------------------------------------------------------------------------
# list


def _list_dataset(data: DataConfig, model: DiTConfig, seed: int, required_fields: tuple[str, ...]):
    tensors = ("latents", "context") + (("clip_fea", "y") if model.model_type == "i2v" else ())
    return LatentListDataset(data.list_file, required_fields, latent_channels=model.out_dim, tensors=tensors)


def _list_prompts(data: DataConfig, model: DiTConfig, count: int, seed: int) -> Prompts:
    """The first samples of `data.val_list_file` (else of `data.list_file`), with their prompts."""
    dataset = LatentListDataset(data.val_list_file or data.list_file, latent_channels=model.out_dim)
    return first_samples(dataset, [meta.get("prompt") for meta in dataset.metas], count, seed)


def _list_held_out(data: DataConfig, seed: int) -> tuple[DataConfig, int]:
    if data.val_list_file is None:
        raise ConfigError("data.val_list_file is not set: reward model validation needs held-out samples")
    return dataclasses.replace(data, list_file=data.val_list_file, val_list_file=None), seed


register_source("list", DataSource(dataset=_list_dataset, prompts=_list_prompts, held_out=_list_held_out))


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; text contexts of different lengths are zero-padded, which is what the DiT does anyway."""
    batch = {}
    for key in samples[0]:
        tensors = [s[key] for s in samples]
        if key.endswith("context") and len({t.shape[0] for t in tensors}) > 1:
            longest = max(t.shape[0] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in tensors]
        batch[key] = torch.stack(tensors)
    return batch
