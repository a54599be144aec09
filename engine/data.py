"""Latent datasets and the resumable sampler that shards them across data-parallel groups.

A sample is a dict of tensors: `latents` [16, F, H, W], `context` [L, text_dim] and, for i2v, `clip_fea`
[257, clip_dim] and `y` [20, F, H, W] (4 mask + 16 condition channels). Every dataset also has `null_context`,
the text embedding that replaces a dropped prompt.
"""

from __future__ import annotations

import torch

from engine.dit import CLIP_TOKENS, DiTConfig


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

    def __init__(self, seed: int, sample_numbers: list[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(seed * 1_000_003 + n) for n in sample_numbers]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        """[B, *shape] standard normal draws."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def rand(self, *shape: int) -> torch.Tensor:
        """[B, *shape] uniform draws in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
