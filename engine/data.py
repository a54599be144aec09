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

engine/preprocess.py writes such a dataset from videos. Samples of different latent shapes (portrait and landscape
videos) train together through `sample_order`, which keeps each micro-batch to one shape.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
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


def first_frame_mask(channels: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The mask part of Wan's i2v condition: [channels, f, h, w], ones on latent frame 0 (the given frame)."""
    mask = torch.zeros(channels, *shape)
    mask[:, 0] = 1
    return mask


def first_frame_condition(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Wan's i2v condition: a mask (ones on latent frame 0) followed by the first frame's latent, zeros after."""
    condition = torch.zeros_like(latents)
    condition[:, 0] = latents[:, 0]
    return torch.cat([first_frame_mask(channels - latents.shape[0], latents.shape[1:]), condition])


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


class BucketedOrder:
    """GlobalOrder for a dataset of several latent shapes: the `micro_batch` consecutive sample numbers of a
    micro-batch (starting at a multiple of `micro_batch`, as `Trainer.sample_numbers` takes them) are samples of one
    shape, so they stack.

    Epoch e shuffles each bucket (the samples of one shape), fills its last micro-batch up with the bucket's first
    samples in that order, and visits the micro-batches of all buckets in a random order. Like GlobalOrder it depends
    only on (seed, sample number): every rank and a resumed run agree.
    """

    def __init__(self, shapes: list[tuple[int, ...]], micro_batch: int, seed: int) -> None:
        if not shapes:
            raise ValueError("the dataset is empty")
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch}: expected at least 1")
        buckets: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            buckets.setdefault(tuple(shape), []).append(index)
        self.buckets = [buckets[shape] for shape in sorted(buckets)]
        self.micro_batch, self.seed = micro_batch, seed
        self.epoch_length = sum(-(-len(bucket) // micro_batch) * micro_batch for bucket in self.buckets)
        self._epoch, self._order = -1, None

    def index(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, self.epoch_length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            batches = []
            for bucket in self.buckets:
                order = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
                order += [order[i % len(order)] for i in range(-len(order) % self.micro_batch)]
                batches += [order[i:i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
            visit = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch, self._order = epoch, [index for b in visit for index in batches[b]]
        return self._order[position]


def sample_order(dataset, micro_batch: int, seed: int) -> GlobalOrder | BucketedOrder:
    """The run's sample order: GlobalOrder, or BucketedOrder when the dataset's `latent_shapes` differ."""
    shapes = getattr(dataset, "latent_shapes", None)
    if shapes is None or len(set(shapes)) == 1:
        return GlobalOrder(len(dataset), seed)
    return BucketedOrder(shapes, micro_batch, seed)


class SampleRandomness:
    """One generator per sample, seeded from (run seed, sample number): noise, timesteps and prompt dropout do not
    depend on how a global batch is split over ranks and micro-batches, and a resumed run redraws the same."""

    def __init__(self, seed: int, sample_numbers: list[int], device: torch.device | str = "cpu",
                 micro_batch: int = 0, step: int = 0) -> None:
        # `step`: the optimizer step this micro-batch belongs to (schedules such as the reward model's noise curriculum)
        self.device, self.step = torch.device(device), step
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
    so a broken record stops the run at once, naming its file and field, instead of hours in. Every sample file
    must hold the tensors named by `tensors` (i2v adds `clip_fea` and `y`)."""

    def __init__(self, list_file: str | Path, required_fields: tuple[str, ...] = (),
                 latent_channels: int | None = None, tensors: tuple[str, ...] = ("latents", "context")) -> None:
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
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{list_file}:{number}: meta file {meta_path} is not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
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
        self.latent_channels, self.tensors = latent_channels, tensors

    def __len__(self) -> int:
        return len(self.metas)

    @functools.cached_property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Each sample's latent shape [C, F, H, W], from its meta or, where a meta has none, the file's header."""
        shapes = []
        for meta, path in zip(self.metas, self.sample_paths):
            shape = meta.get("latent_shape")
            if shape is None:
                with safe_open(path, framework="pt") as f:
                    shape = f.get_slice("latents").get_shape()
            shapes.append(tuple(shape))
        return shapes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.sample_paths[index]
        if not path.is_file():
            raise FileNotFoundError(f"sample file {path} (from meta {self.metas[index]['id']}) does not exist")
        sample = load_file(path)
        for key in self.tensors:
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
        from engine.synthetic import MOTIONS, SyntheticMotion

        motions = tuple(data.synthetic_motions or MOTIONS)
        first_frame = model.model_type == "i2v"  # the first-frame variant: an i2v generator reads its condition
        if "wrong_start" in motions and not first_frame:
            raise ValueError(f"data.synthetic_motions={list(motions)}: wrong_start is a kind of the first-frame "
                             f"(image-to-video) variant; this {model.model_type} model has no first frame to miss")
        return SyntheticMotion(data.num_samples, seed=seed, motions=motions, varied_looks=data.synthetic_varied_looks,
                               first_frame=first_frame)
    tensors = ("latents", "context") + (("clip_fea", "y") if model.model_type == "i2v" else ())
    return LatentListDataset(data.list_file, required_fields, latent_channels=model.out_dim, tensors=tensors)


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
