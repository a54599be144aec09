"""Latent datasets, their on-disk format, the run-wide sample order and per-sample randomness.

A sample is a dict of tensors: `latents` [16, F, H, W], `context` [L, text_dim] and, for i2v, `clip_fea`
[257, clip_dim] and `y` [20, F, H, W] (4 mask + 16 condition channels); labelled samples add float scalars such as
`physics_quality`. Every dataset also has `null_context`, the text embedding that replaces a dropped prompt.

On disk (written by `write_sample` / `write_list`, read by `LatentListDataset`):

    <root>/samples/<id>.safetensors   the sample's tensors (latents, context[, clip_fea, y])
    <root>/meta/<id>.json             {"id", "prompt", "sample_path" (relative to this file), "latent_shape",
                                       labels such as "physics_quality" / "human_quality" / "motion_quality", ...}
    <root>/<name>.list                one meta path per line, relative to the list file
    <root>/null_context.safetensors   {"context": [L0, text_dim]}: the empty prompt's embedding
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.dit import CLIP_TOKENS, DiTConfig

LABEL_FIELDS = ("physics_quality", "human_quality", "motion_quality")


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


def first_frame_condition(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Wan's i2v condition: a mask (ones on latent frame 0) followed by the first frame's latent, zeros after."""
    mask_channels = channels - latents.shape[0]
    mask = torch.zeros(mask_channels, *latents.shape[1:])
    mask[:, 0] = 1
    condition = torch.zeros_like(latents)
    condition[:, 0] = latents[:, 0]
    return torch.cat([mask, condition])


class GlobalOrder:
    """Which dataset index the run's g-th sample is: epoch e = g // N visits a fresh permutation of the N samples.

    A step consumes consecutive sample numbers, whatever the layout (see `Trainer.sample_numbers`), so a run on
    one rank and a run on eight with the same global batch see the same samples in the same steps, and resuming
    needs only the count of samples consumed.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._order = -1, None

    def index(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator).tolist()
        return self._order[position]


class SampleRandomness:
    """One generator per sample, seeded from (run seed, sample number): noise, timesteps and prompt dropout do not
    depend on how a global batch is split over ranks and micro-batches, and a resumed run redraws the same."""

    def __init__(self, seed: int, sample_numbers: list[int], device: torch.device | str = "cpu",
                 micro_batch: int = 0) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(seed * 1_000_003 + n) for n in sample_numbers]
        # One draw per run-wide micro-batch, the same on every rank: choices that must agree across ranks (the
        # PRFL step index, which decides how many collective ZeRO-3 forwards each rank runs).
        self.shared = torch.Generator().manual_seed(seed * 7_919 + 104_729 * micro_batch + 1)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        """[B, *shape] standard normal draws."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def rand(self, *shape: int) -> torch.Tensor:
        """[B, *shape] uniform draws in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])

    def shared_rand(self) -> float:
        """A uniform draw in [0, 1) that every rank makes alike for this micro-batch."""
        return torch.rand(1, generator=self.shared).item()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    os.replace(staging, path)


def write_sample(root: str | Path, sample_id: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Store one sample (tensors + meta JSON) under `root`, each file through a temporary name; returns the meta path."""
    root = Path(root)
    (root / "samples").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, root / "samples" / f"{sample_id}.safetensors")
    meta = {"id": sample_id, "sample_path": f"../samples/{sample_id}.safetensors",
            "latent_shape": list(tensors["latents"].shape), **meta}
    meta_path = root / "meta" / f"{sample_id}.json"
    staging = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(meta, indent=1))
    os.replace(staging, meta_path)
    return meta_path


def write_list(root: str | Path, name: str, meta_paths: list[Path], null_context: torch.Tensor) -> Path:
    """The list file naming the samples of a split, and the null prompt embedding beside it."""
    root = Path(root)
    list_path = root / f"{name}.list"
    staging = list_path.with_name(f".{list_path.name}.tmp-{os.getpid()}")
    staging.write_text("".join(f"{Path(p).resolve().relative_to(root.resolve())}\n" for p in meta_paths))
    os.replace(staging, list_path)
    _atomic_save({"context": null_context}, root / "null_context.safetensors")
    return list_path


class LatentListDataset(torch.utils.data.Dataset):
    """Samples named by a list file. Each meta is checked for the fields the task needs when the dataset opens,
    so a broken record stops the run at once, naming its file and field, instead of hours in."""

    def __init__(self, list_file: str | Path, required_fields: tuple[str, ...] = (),
                 latent_channels: int | None = None) -> None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"data list {list_file} does not exist")
        self.metas: list[dict] = []
        self.sample_paths: list[Path] = []
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            meta_path = (list_file.parent / line.strip())
            if not meta_path.is_file():
                raise FileNotFoundError(f"{list_file}:{number}: meta file {meta_path} does not exist")
            meta = json.loads(meta_path.read_text())
            for field in ("sample_path", *required_fields):
                if field not in meta:
                    raise ValueError(f"{meta_path}: missing field {field!r} (needed: sample_path"
                                     + "".join(f", {f}" for f in required_fields) + ")")
            shape = meta.get("latent_shape")
            if latent_channels is not None and shape is not None and shape[0] != latent_channels:
                raise ValueError(f"{meta_path}: latent_shape={shape}: the model expects {latent_channels} latent "
                                 "channels")
            self.metas.append(meta)
            self.sample_paths.append(meta_path.parent / meta["sample_path"])
        if not self.metas:
            raise ValueError(f"data list {list_file} names no samples")
        null_path = list_file.parent / "null_context.safetensors"
        if not null_path.is_file():
            raise FileNotFoundError(f"{null_path} (the empty prompt's embedding) does not exist beside {list_file}")
        self.null_context = load_file(null_path)["context"]
        self.latent_channels = latent_channels

    def __len__(self) -> int:
        return len(self.metas)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.sample_paths[index]
        if not path.is_file():
            raise FileNotFoundError(f"sample file {path} (from meta {self.metas[index]['id']}) does not exist")
        sample = load_file(path)
        for key in ("latents", "context"):
            if key not in sample:
                raise KeyError(f"{path}: no tensor {key!r} (has {', '.join(sample)})")
        if self.latent_channels is not None and sample["latents"].shape[0] != self.latent_channels:
            raise ValueError(f"{path}: latents has shape {tuple(sample['latents'].shape)}: the model expects "
                             f"{self.latent_channels} latent channels")
        labels = {k: torch.tensor(float(self.metas[index][k])) for k in LABEL_FIELDS if k in self.metas[index]}
        return {**sample, **labels}


def build_dataset(data, model: DiTConfig, seed: int, required_fields: tuple[str, ...] = ()):
    """The dataset a run config's `data` section names; `required_fields` must be in every meta of a list."""
    if data.source == "random":
        return RandomLatents(model, data.num_samples, data.latent_shape, data.text_tokens, seed=seed)
    if data.source == "synthetic":
        from engine.synthetic import SyntheticMotion

        return SyntheticMotion(data.num_samples, seed=seed)
    return LatentListDataset(data.list_file, required_fields, latent_channels=model.out_dim)


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
