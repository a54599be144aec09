"""Rectified-flow conventions of Wan2.1 and the sampler.

    x_t = (1 - sigma) * x_0 + sigma * eps,  sigma in [0, 1],  model timestep t = 1000 * sigma
    v = eps - x_0  (the model predicts v),  x_0 = x_t - sigma * v
    shift:  sigma' = shift * sigma / (1 + (shift - 1) * sigma)

Sampling uses diffusers' schedulers (`FlowMatchEulerDiscreteScheduler`, and `UniPCMultistepScheduler` with flow
prediction, configured as Wan's diffusers pipelines configure it).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

NUM_TRAIN_TIMESTEPS = 1000

# velocity(x_t [B, C, F, H, W], t [B], context [B, L, text_dim]) -> v, e.g. a DiT with clip_fea / y bound.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`, in its dtype."""
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Wan's timestep shift; shift > 1 moves sigmas toward 1 (more time at high noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample sigma [B]."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = eps - x_0."""
    return noise - x0


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One-step estimate of the clean latent from a velocity prediction."""
    return x_t - _per_sample(sigma, x_t) * velocity


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def training_sigmas(u: torch.Tensor, scheme: Literal["uniform", "logit_normal"] = "uniform", shift: float = 1.0,
                    logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Training sigmas from uniform draws u in [0, 1): uniform, or logit-normal (SD3) by inverse CDF; then shifted."""
    if scheme == "uniform":
        sigma = u
    elif scheme == "logit_normal":
        sigma = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)))
    else:
        raise ValueError(f"timestep scheme {scheme!r}: expected 'uniform' or 'logit_normal'")
    return shift_sigma(sigma, shift)


def make_scheduler(solver: Literal["euler", "unipc"], steps: int, shift: float, device: torch.device | str = "cpu"):
    """A diffusers scheduler with `steps` timesteps set.

    Euler: sigmas linspace(1, 0, steps + 1)[:-1], shifted, then 0. UniPC (order 2, bh2, x0-prediction, zero final
    sigma, as Wan's diffusers pipelines configure it): linspace(1, 1/1000, steps + 1)[:-1], shifted, then 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    if solver == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist(), device=device)
    elif solver == "unipc":
        scheduler = UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
                                            predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
        scheduler.set_timesteps(steps, device=device)
    else:
        raise ValueError(f"solver {solver!r}: expected 'euler' or 'unipc'")
    return scheduler


def guided_velocity(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    guidance_scale: float, negative_context: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free guidance: v_neg + g * (v_cond - v_neg); plain v_cond when g == 1 or no negative context."""
    v = velocity(x, t, context)
    if negative_context is None or guidance_scale == 1.0:
        return v
    v_neg = velocity(x, t, negative_context)
    return v_neg + guidance_scale * (v - v_neg)


# no_grad, not inference_mode: the velocity may be a ZeRO-3 engine (sampling during training), whose parameters
# gathered here would become inference tensors that its next training step cannot use.
@torch.no_grad()
def sample(velocity: VelocityFn, noise: torch.Tensor, context: torch.Tensor, *, steps: int = 40,
           solver: Literal["euler", "unipc"] = "unipc", shift: float = 5.0, guidance_scale: float = 1.0,
           negative_context: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise `noise` [B, C, F, H, W] to a clean latent in `steps` model evaluations (each doubled under CFG)."""
    if guidance_scale != 1.0 and negative_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a negative_context (e.g. the empty-prompt embedding)")
    scheduler = make_scheduler(solver, steps, shift, device=noise.device)
    x = noise.float()
    for t in scheduler.timesteps:
        t_batch = t.float().expand(x.shape[0]).to(x.device)
        v = guided_velocity(velocity, x, t_batch, context, guidance_scale, negative_context)
        x = scheduler.step(v.float(), t, x, return_dict=False)[0]
    return x
