"""The on-disk latent format: writing samples and list files, and `LatentListDataset`, which reads them.

A sample is a dict of tensors: `latents` [16, F, H, W], `context` [L, text_dim] and, for i2v, `clip_fea`
[257, clip_dim] and `y` [20, F, H, W] (4 mask + 16 condition channels); labelled samples add float scalars such as
`physics_quality`. Every dataset also has `null_context`, the text embedding that replaces a dropped prompt.

    <root>/samples/<id>.safetensors   the sample's tensors (latents, context[, clip_fea, y])
    <root>/meta/<id>.json             {"id", "prompt", "sample_path" (relative to this file), "latent_shape",
                                       labels such as "physics_quality" / "human_quality" / "motion_quality", ...}
    <root>/<name>.list                one meta path per line, relative to the list file
    <root>/null_context.safetensors   {"context": [L0, text_dim]}: the empty prompt's embedding

engine/data/preprocess.py writes such a dataset from videos.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LABEL_FIELDS = ("physics_quality", "human_quality", "motion_quality")


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
