"""Flow-matching conventions (DESIGN section 2) and the sampler."""

import pytest
import torch

from engine.model.flow import (
    add_noise,
    guided_velocity,
    make_scheduler,
    predict_x0,
    sample,
    shift_sigma,
    timestep_from_sigma,
    training_sigmas,
    velocity_target,
)


@pytest.fixture
def clean_and_noise():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)


def test_noising_target_and_x0_are_consistent(clean_and_noise):
    x0, eps = clean_and_noise
    sigma = torch.tensor([0.25, 0.9])
    x_t = add_noise(x0, eps, sigma)
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(predict_x0(x_t, velocity_target(x0, eps), sigma), x0)
    torch.testing.assert_close(timestep_from_sigma(sigma), torch.tensor([250.0, 900.0]))


def test_shift_formula():
    sigma = torch.tensor([0.0, 0.2, 0.5, 1.0])
    torch.testing.assert_close(shift_sigma(sigma, 5.0), 5 * sigma / (1 + 4 * sigma))
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    torch.testing.assert_close(shift_sigma(sigma, 1.0), sigma)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_sampler_recovers_x0_from_the_exact_velocity(solver, clean_and_noise):
    x0, eps = clean_and_noise
    out = sample(lambda x, t, c: (eps - x0).expand_as(x), eps, context=None, steps=7, solver=solver, shift=5.0)
    assert (out - x0).abs().max() < 1e-4


def test_euler_schedule_is_the_shifted_linspace():
    scheduler = make_scheduler("euler", steps=5, shift=5.0)
    expected = shift_sigma(torch.linspace(1, 0, 6)[:-1], 5.0)
    torch.testing.assert_close(scheduler.sigmas[:-1], expected)
    assert scheduler.sigmas[-1] == 0
    torch.testing.assert_close(scheduler.timesteps, 1000 * expected)


def test_unipc_schedule_is_shifted_like_wan():
    scheduler = make_scheduler("unipc", steps=40, shift=5.0)
    expected = shift_sigma(torch.linspace(1, 1 / 1000, 41, dtype=torch.float64)[:-1], 5.0).float()
    torch.testing.assert_close(scheduler.sigmas[:-1], expected)  # (diffusers nudges the first by 1e-6 below 1)
    assert scheduler.sigmas[-1] == 0 and len(scheduler.timesteps) == 40
    torch.testing.assert_close(scheduler.timesteps[:4], torch.tensor([999, 994, 989, 984]))


def test_sampler_steps_call_the_model_at_the_scheduled_timesteps(clean_and_noise):
    x0, eps = clean_and_noise
    seen = []

    def velocity(x, t, context):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    sample(velocity, eps, None, steps=4, solver="euler", shift=3.0)
    torch.testing.assert_close(torch.tensor(seen), 1000 * shift_sigma(torch.linspace(1, 0, 5)[:-1], 3.0))


def test_classifier_free_guidance_combines_conditional_and_negative():
    def velocity(x, t, context):
        return x * context

    x, t = torch.ones(1, 2), torch.zeros(1)
    cond, neg = torch.tensor(3.0), torch.tensor(1.0)
    torch.testing.assert_close(guided_velocity(velocity, x, t, cond, 5.0, neg), torch.full((1, 2), 1 + 5 * (3 - 1.0)))
    torch.testing.assert_close(guided_velocity(velocity, x, t, cond, 1.0, neg), torch.full((1, 2), 3.0))
    with pytest.raises(ValueError, match="negative_context"):
        sample(velocity, torch.ones(1, 16, 1, 2, 2), cond, steps=2, guidance_scale=5.0)


def test_training_sigmas():
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(training_sigmas(u, "uniform"), u)
    torch.testing.assert_close(training_sigmas(u, "uniform", shift=3.0), shift_sigma(u, 3.0))
    logit = torch.logit(training_sigmas(u, "logit_normal", logit_mean=0.5, logit_std=2.0))
    assert abs(logit.mean().item() - 0.5) < 0.05 and abs(logit.std().item() - 2.0) < 0.05
    shifted = training_sigmas(u, "logit_normal", shift=3.0)
    assert abs(shifted.median().item() - shift_sigma(0.5, 3.0)) < 0.01
    with pytest.raises(ValueError, match="'uniform' or 'logit_normal'"):
        training_sigmas(u, "beta")
