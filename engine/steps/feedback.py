"""The reward-feedback step that PRFL and RGB ReFL share: roll the generator's sampling chain out to a step k drawn
from `prfl.stage` without gradients, take step k with gradients (guidance applied), and hand the result to a frozen
scorer, whose logits give the reward loss. The methods differ only in the scorer: PRFL's scores x_{k+1} at t_{k+1}
with the latent reward model (steps/prfl.py), RGB ReFL's decodes the one-step x0 prediction and scores pixels
(steps/rgb_refl.py).

    step = PRFLStep(run_config.prfl, run_config.sampling, reward_model)      # a FeedbackStep with a LatentScorer
    loss, metrics = step(generator, batch, rng)    # batch: latents (for the shape), context (+ clip_fea, y for i2v)
    step = FeedbackWithSFTStep(step, SFTStep(run_config.sft, null_context), run_config.prfl.sft_weight)

Only step k keeps activations: steps 0..k-1 run without gradients. The scorer's models are frozen for real (no
parameter takes a gradient); only the gradient with respect to their input flows back into the generator. The step
index k comes from the micro-batch's shared draw, so every rank takes the same number of model evaluations (ZeRO-3
gathers parameters collectively).

Image-to-video: every evaluation of the chain, step k's and the SFT loss's get the sample's CLIP features and
first-frame condition `y` (the rollout carries them to the scorer). Under rollout guidance the unconditional branch
drops the prompt only and keeps the image, as Wan's I2V pipeline does (its `arg_null` keeps `clip_fea` and `y`;
diffusers' WanImageToVideoPipeline passes the image embeddings and the condition to both branches).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from engine.config import PRFLConfig, SamplingConfig
from engine.model.dit import DiTInputs, wide
from engine.model.flow import guided_velocity, make_scheduler
from engine.train.randomness import SampleRandomness


def stage_steps(stage: str, steps: int) -> range:
    """The step indices k (0-based, of `steps`) a stage draws from: the paper's thirds of the chain (early / middle
    / late: steps 1-13 / 14-26 / 27-40 of 40), `last_quarter` (where RGB ReFL supervises: nearly clean latents) or
    `all`."""
    third = steps // 3
    ranges = {"all": range(steps), "early": range(0, third), "middle": range(third, 2 * third),
              "late": range(2 * third, steps), "last_quarter": range(steps - max(steps // 4, 1), steps)}
    if not ranges[stage]:
        raise ValueError(f"prfl.stage={stage!r} holds no step of a {steps}-step chain (sampling.steps); it needs "
                         "at least 3 steps")
    return ranges[stage]


def step_index(u: float, steps: int, stage: str) -> int:
    """The gradient step k for a uniform draw u in [0, 1): uniform over the stage's steps."""
    candidates = stage_steps(stage, steps)
    return candidates[min(int(u * len(candidates)), len(candidates) - 1)]


def stage_of(k: int, steps: int) -> str:
    """The third of the chain that step k lies in, under which its reward is logged."""
    return next(stage for stage in ("early", "middle", "late") if k in stage_steps(stage, max(steps, 3)))


def reward_loss(logits: torch.Tensor, config: PRFLConfig) -> torch.Tensor:
    """weight * objective(logit), averaged over the batch, in fp32 (float64 for a float64 reward model)."""
    r = wide(logits)
    if config.objective == "logit":
        per_sample = -r
    elif config.objective == "log_sigmoid":
        per_sample = -F.logsigmoid(r)
    elif config.objective == "hinge":
        per_sample = F.relu(config.margin - r)
    else:
        per_sample = F.relu(config.target - torch.sigmoid(r))
    return config.weight * per_sample.mean()


class Rollout(NamedTuple):
    """The chain rolled out to step k (no gradients), ready for the gradient step."""

    x: torch.Tensor  # x_k [B, C, F, H, W]
    k: int
    scheduler: object  # the diffusers scheduler, its multistep history up to step k
    context: torch.Tensor
    negative: torch.Tensor | None  # empty-prompt context for guidance, or None
    clip_fea: torch.Tensor | None = None  # i2v: the samples' CLIP features and first-frame condition
    y: torch.Tensor | None = None


class Scorer(Protocol):
    """Scores step k: frozen models from the rollout and step k's guided velocity to logits [B] (fp32 or wider)."""

    name: str  # the method: what the step logs under and the progress bar shows
    reward_model: torch.nn.Module  # the frozen model that gives the logits

    def __call__(self, rollout: "Rollout", velocity: torch.Tensor) -> torch.Tensor: ...


def check_frozen(model: torch.nn.Module, what: str, method: str) -> None:
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"the {what} must be frozen (requires_grad_(False)) before {method}")


class FeedbackStep:
    """Loss of one micro-batch of the reward step; the noise comes from the per-sample generators.

    `__call__` is `rollout`, then one model evaluation on `gradient_inputs`, then `reward`; `FeedbackWithSFTStep`
    batches that evaluation with the SFT loss's, so each parameter enters the graph once (ZeRO-3 requires it)."""

    def __init__(self, config: PRFLConfig, sampling: SamplingConfig, scorer: Scorer,
                 null_context: torch.Tensor | None = None, step_override: int | None = None) -> None:
        if config.rollout_guidance != 1.0 and null_context is None:
            raise ValueError(f"prfl.rollout_guidance={config.rollout_guidance} needs the empty prompt's embedding")
        stage_steps(config.stage, sampling.steps)  # fails now, naming both settings, if the stage is empty
        self.config, self.sampling, self.scorer = config, sampling, scorer
        self.null_context = null_context
        self.step_override = step_override  # tests: a fixed k

    @property
    def name(self) -> str:
        return self.scorer.name

    @property
    def reward_model(self) -> torch.nn.Module:
        return self.scorer.reward_model

    def rollout(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness) -> Rollout:
        context, clip_fea, y = batch["context"], batch.get("clip_fea"), batch.get("y")
        x = rng.randn(*batch["latents"].shape[1:]).float()
        steps = self.sampling.steps
        k = self.step_override if self.step_override is not None else \
            step_index(rng.shared_rand(), steps, self.config.stage)
        negative = None
        if self.config.rollout_guidance != 1.0:
            negative = F.pad(self.null_context.to(context), (0, 0, 0, context.shape[1] - self.null_context.shape[0]))
            negative = negative.expand_as(context)
        scheduler = make_scheduler(self.sampling.solver, steps, self.sampling.shift, device=x.device)

        def velocity(x_t, t, text):  # both guidance branches see the image
            return model(x_t, t, text, clip_fea=clip_fea, y=y)

        # no_grad, not inference_mode: under ZeRO-3 the parameters gathered for the rollout would become inference
        # tensors that the gradient step then cannot use.
        with torch.no_grad():
            for t in scheduler.timesteps[:k]:
                v = guided_velocity(velocity, x, t.float().expand(x.shape[0]).to(x.device), context,
                                    self.config.rollout_guidance, negative)
                x = scheduler.step(v.float(), t, x, return_dict=False)[0]
        return Rollout(x, k, scheduler, context, negative, clip_fea, y)

    def gradient_inputs(self, rollout: Rollout) -> DiTInputs:
        """Step k's model evaluation; conditional and unconditional halves under guidance."""
        x = rollout.x
        t = rollout.scheduler.timesteps[rollout.k].float().expand(x.shape[0]).to(x.device)
        conditional = DiTInputs(x, t, rollout.context, rollout.clip_fea, rollout.y)
        if rollout.negative is None:
            return conditional
        return DiTInputs.cat(conditional, conditional._replace(context=rollout.negative))

    def guided(self, rollout: Rollout, velocity: torch.Tensor) -> torch.Tensor:
        """Step k's velocity from the model's output on `gradient_inputs` (guidance applied)."""
        if rollout.negative is None:
            return wide(velocity)
        conditional, unconditional = wide(velocity).chunk(2)
        return unconditional + self.config.rollout_guidance * (conditional - unconditional)

    def metrics(self, loss: torch.Tensor, scores: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """What a reward step logs: its loss, the reward's mean and spread in the micro-batch, the reward under the
        third of the chain k lies in, and where k fell."""
        scores = scores.detach()
        return {"loss/reward": loss.detach(), "reward/logit_mean": scores.mean(),
                "reward/logit_std": scores.std(unbiased=False),  # within the micro-batch
                f"reward/logit_{stage_of(k, self.sampling.steps)}": scores.mean(),
                "reward/step_fraction": torch.tensor(k / self.sampling.steps, device=scores.device)}

    def reward(self, rollout: Rollout, velocity: torch.Tensor):
        """Score step k from the model's output on `gradient_inputs`; the loss and what the step logs."""
        logits = wide(self.scorer(rollout, self.guided(rollout, velocity)))
        loss = reward_loss(logits, self.config)
        return loss, self.metrics(loss, logits, rollout.k)

    def __call__(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness):
        rollout = self.rollout(model, batch, rng)
        return self.reward(rollout, self.gradient_inputs(rollout)(model))


class FeedbackWithSFTStep:
    """The update rule of PRFL (and of RGB ReFL alike): reward loss on the batch's prompts + sft_weight *
    flow-matching loss on its latents, as one combined loss (one backward, one clip and one optimizer step per
    accumulation window). Step k and the SFT prediction share one batched model evaluation. The SFT part drops
    prompts for classifier-free guidance; the reward part never does."""

    def __init__(self, reward_step: FeedbackStep, sft_step, sft_weight: float) -> None:
        self.reward_step, self.sft_step, self.sft_weight = reward_step, sft_step, sft_weight
        self.name = reward_step.name

    def __call__(self, model, batch: dict[str, torch.Tensor], rng: SampleRandomness):
        if not self.sft_weight:
            loss, metrics = self.reward_step(model, batch, rng)
            return loss, {**metrics, "loss/total": loss.detach()}
        rollout = self.reward_step.rollout(model, batch, rng)
        reward_inputs = self.reward_step.gradient_inputs(rollout)
        sft_inputs, target = self.sft_step.inputs(batch, rng)
        if sft_inputs.context.shape[1] != reward_inputs.context.shape[1]:
            raise ValueError("the reward and SFT contexts differ in length; pad the dataset's text embeddings alike")
        velocity = DiTInputs.cat(reward_inputs, sft_inputs)(model)
        loss, metrics = self.reward_step.reward(rollout, velocity[: len(reward_inputs.x)])
        sft_loss = F.mse_loss(wide(velocity[len(reward_inputs.x):]), target.to(wide(velocity).dtype))
        total = loss + self.sft_weight * sft_loss
        return total, {**metrics, "loss/sft": sft_loss.detach(), "loss/total": total.detach()}
