"""The PRFL reward step: roll the generator's sampling chain out to a random step k without gradients, take step k
with gradients, and let the frozen reward model score x_{k+1} at t_{k+1}, in latent space.

    step = PRFLStep(run_config.prfl, run_config.sampling, reward_model)      # reward_model: a frozen RewardModel
    loss, metrics = step(generator, batch, rng)                             # batch: latents (for the shape), context

Only step k keeps activations: steps 0..k-1 run under `torch.inference_mode()`. The reward model is frozen for
real (no parameter takes a gradient); only the gradient with respect to its input latent flows back into the
generator. The step index k comes from the micro-batch's shared draw, so every rank takes the same number of
model evaluations (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import PRFLConfig, SamplingConfig
from engine.data import SampleRandomness
from engine.flow import NUM_TRAIN_TIMESTEPS, guided_velocity, make_scheduler

# Fractions of the chain each stage draws k from (the paper's ablation; "late" is the last quarter).
STAGES = {"all": (0.0, 1.0), "early": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "late": (0.75, 1.0)}


def step_index(u: float, steps: int, stage: str) -> int:
    """The gradient step k in 0..steps-1 for a uniform draw u in [0, 1): uniform over the stage's steps."""
    lo, hi = STAGES[stage]
    first = min(math.floor(lo * steps), steps - 1)
    last = max(first, math.ceil(hi * steps) - 1)
    return first + min(int(u * (last - first + 1)), last - first)


def reward_loss(logits: torch.Tensor, config: PRFLConfig) -> torch.Tensor:
    """weight * objective(logit), averaged over the batch, in fp32."""
    r = logits.float()
    if config.objective == "logit":
        per_sample = -r
    elif config.objective == "log_sigmoid":
        per_sample = -F.logsigmoid(r)
    elif config.objective == "hinge":
        per_sample = F.relu(config.margin - r)
    else:
        per_sample = F.relu(config.target - torch.sigmoid(r))
    return config.weight * per_sample.mean()


class PRFLStep:
    """Loss of one micro-batch of the reward step; the noise comes from the per-sample generators."""

    name = "prfl"

    def __init__(self, config: PRFLConfig, sampling: SamplingConfig, reward_model: torch.nn.Module,
                 null_context: torch.Tensor | None = None, step_override: int | None = None) -> None:
        if any(p.requires_grad for p in reward_model.parameters()):
            raise ValueError("the reward model must be frozen (requires_grad_(False)) before PRFL")
        if config.rollout_guidance != 1.0 and null_context is None:
            raise ValueError(f"prfl.rollout_guidance={config.rollout_guidance} needs the empty prompt's embedding")
        self.config, self.sampling, self.reward_model = config, sampling, reward_model
        self.null_context = null_context
        self.step_override = step_override  # tests: a fixed k

    def __call__(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness):
        context = batch["context"]
        x = rng.randn(*batch["latents"].shape[1:]).float()
        steps = self.sampling.steps
        k = self.step_override if self.step_override is not None else \
            step_index(rng.shared_rand(), steps, self.config.stage)
        negative = None
        if self.config.rollout_guidance != 1.0:
            negative = F.pad(self.null_context.to(context), (0, 0, 0, context.shape[1] - self.null_context.shape[0]))
            negative = negative.expand_as(context)

        def velocity(x_t, t):
            return guided_velocity(model, x_t, t.float().expand(x_t.shape[0]).to(x_t.device), context,
                                   self.config.rollout_guidance, negative).float()

        scheduler = make_scheduler(self.sampling.solver, steps, self.sampling.shift, device=x.device)
        with torch.inference_mode():
            for t in scheduler.timesteps[:k]:
                x = scheduler.step(velocity(x, t), t, x, return_dict=False)[0]
        x = x.clone()  # a normal tensor again, usable by autograd
        t = scheduler.timesteps[k]
        x_next = scheduler.step(velocity(x, t), t, x, return_dict=False)[0]
        t_next = (scheduler.sigmas[k + 1] * NUM_TRAIN_TIMESTEPS).float().expand(x.shape[0]).to(x.device)
        logits = self.reward_model(x_next.to(next(self.reward_model.parameters()).dtype), t_next, context).float()
        loss = reward_loss(logits, self.config)
        return loss, {"loss/reward": loss.detach(), "reward/logit_mean": logits.detach().mean(),
                      "reward/step_fraction": torch.tensor(k / steps, device=logits.device)}
