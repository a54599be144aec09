"""PRFL: reward feedback scored in latent space. The frozen PAVRM scores x_{k+1}, step k's result, at t_{k+1}, with
the sample's conditions (i2v: its CLIP features and first-frame condition, as the reference does); only the
gradient with respect to its input latent flows back into the generator.

    step = PRFLStep(run_config.prfl, run_config.sampling, reward_model)      # reward_model: a frozen RewardModel
"""

from __future__ import annotations

import torch

from engine.config import PRFLConfig, SamplingConfig
from engine.errors import ConfigError
from engine.model.dit import DiTConfig, wide
from engine.model.flow import NUM_TRAIN_TIMESTEPS
from engine.steps.feedback import FeedbackStep, Rollout, check_frozen


def check_reward_model(generator: DiTConfig, trunk: DiTConfig, generator_source: str, reward_source: str) -> None:
    """A PAVRM reads what its generator is conditioned on (text, or text + image) and the latents it makes; one that
    does not is refused at start-up, naming both."""
    if trunk.model_type != generator.model_type:
        raise ConfigError(f"{reward_source} is a {trunk.model_type} reward model but {generator_source} is a "
                          f"{generator.model_type} generator: a PAVRM scores with its generator's conditioning; train "
                          f"a {generator.model_type} PAVRM on it (runners/pavrm.py)")
    # It reads the generator's latents with their condition (in_dim), its text and (i2v) its image features.
    widths = ("in_dim", "text_dim") + (("clip_dim",) if trunk.model_type == "i2v" else ())
    for name in widths:
        if getattr(trunk, name) != getattr(generator, name):
            raise ConfigError(f"{reward_source} reads {name}={getattr(trunk, name)} but {generator_source} has "
                              f"{name}={getattr(generator, name)}")


class LatentScorer:
    """Finish step k and score x_{k+1} at t_{k+1} with the frozen PAVRM."""

    name = "prfl"

    def __init__(self, reward_model: torch.nn.Module) -> None:
        check_frozen(reward_model, "reward model", "PRFL")
        self.reward_model = reward_model

    def __call__(self, rollout: Rollout, velocity: torch.Tensor) -> torch.Tensor:
        scheduler, k, x = rollout.scheduler, rollout.k, rollout.x
        x_next = scheduler.step(velocity, scheduler.timesteps[k], x, return_dict=False)[0]
        t_next = (scheduler.sigmas[k + 1] * NUM_TRAIN_TIMESTEPS).float().expand(x.shape[0]).to(x.device)
        dtype = next(self.reward_model.parameters()).dtype
        return wide(self.reward_model(x_next.to(dtype), t_next, rollout.context, clip_fea=rollout.clip_fea,
                                      y=rollout.y))


class PRFLStep(FeedbackStep):
    """The reward-feedback step with the latent scorer."""

    def __init__(self, config: PRFLConfig, sampling: SamplingConfig, reward_model: torch.nn.Module,
                 null_context: torch.Tensor | None = None, step_override: int | None = None) -> None:
        super().__init__(config, sampling, LatentScorer(reward_model), null_context, step_override)
