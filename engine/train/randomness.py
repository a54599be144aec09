"""Per-sample randomness: what a training step draws depends on the run seed and the sample's number only."""

from __future__ import annotations

import torch


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
