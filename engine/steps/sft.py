"""The flow-matching (SFT) training step: regress the velocity eps - x_0 at a random noise level."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import SFTConfig
from engine.model.dit import DiTInputs
from engine.model.flow import add_noise, timestep_from_sigma, training_sigmas, velocity_target
from engine.train.randomness import SampleRandomness


def drop_prompts(context: torch.Tensor, null_context: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Replace the prompts of the samples flagged in `dropped` [B] by the null prompt (zero-padded to length)."""
    null = F.pad(null_context.to(context), (0, 0, 0, context.shape[1] - null_context.shape[0]))
    return torch.where(dropped.to(context.device).view(-1, 1, 1), null, context)


class SFTStep:
    """Loss of one micro-batch; all randomness comes from the per-sample generators the trainer hands in."""

    name = "sft"

    def __init__(self, config: SFTConfig, null_context: torch.Tensor) -> None:
        self.config, self.null_context = config, null_context

    def inputs(self, batch: dict[str, torch.Tensor], rng: SampleRandomness) -> tuple[DiTInputs, torch.Tensor]:
        """(model inputs, target) of the flow-matching loss: noised latents, their timesteps, the prompts with
        dropout applied (the image condition of i2v is kept), and the velocity to regress."""
        x0 = batch["latents"]
        noise = rng.randn(*x0.shape[1:]).to(x0)
        sigma = training_sigmas(rng.rand(), self.config.timesteps, self.config.shift).view(-1).to(x0.device)
        context = drop_prompts(batch["context"], self.null_context, rng.rand().view(-1) < self.config.text_dropout)
        inputs = DiTInputs(add_noise(x0, noise, sigma), timestep_from_sigma(sigma), context, batch.get("clip_fea"),
                           batch.get("y"))
        return inputs, velocity_target(x0, noise)

    def __call__(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness):
        inputs, target = self.inputs(batch, rng)
        loss = F.mse_loss(inputs(model).float(), target.float())
        return loss, {"loss/sft": loss.detach()}
