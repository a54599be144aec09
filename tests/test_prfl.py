"""The PRFL reward step: step-index stages, reward objectives, the gradient through step k (against finite
differences), no activations kept for the rollout, and a reward model that stays frozen."""

import copy

import pytest
import torch

from conftest import randomized_dit
from engine.config_io import load_config
from engine.model.reward import RewardModel, RewardModelConfig
from engine.steps.feedback import reward_loss, stage_of, step_index
from engine.steps.prfl import PRFLStep
from engine.train.randomness import SampleRandomness


def test_stages_draw_the_step_index_from_their_part_of_the_chain():
    draws = [i / 4000 for i in range(4000)]
    whole = [step_index(u, 40, "all") for u in draws]
    assert set(whole) == set(range(40)) and max(whole.count(k) for k in range(40)) == 100  # uniform, last included
    # the paper's stages of a 40-step chain: steps 1-13, 14-26, 27-40
    assert set(step_index(u, 40, "early") for u in draws) == set(range(0, 13))
    assert set(step_index(u, 40, "middle") for u in draws) == set(range(13, 26))
    assert set(step_index(u, 40, "late") for u in draws) == set(range(26, 40))
    assert set(step_index(u, 40, "last_quarter") for u in draws) == set(range(30, 40))
    assert [stage_of(k, 40) for k in (0, 12, 13, 25, 26, 39)] == ["early", "early", "middle", "middle", "late", "late"]
    assert step_index(0.99, 1, "last_quarter") == 0
    with pytest.raises(ValueError, match="prfl.stage='middle' holds no step of a 2-step chain"):
        step_index(0.5, 2, "middle")


@pytest.mark.parametrize("objective,expected,slope", [
    ("logit", [-0.5, 3.0], [-0.5, -0.5]),
    ("log_sigmoid", [0.474077, 3.048587], [-0.5 * 0.377541, -0.5 * 0.952574]),
    ("hinge", [1.5, 5.0], [-0.5, -0.5]),
])
def test_reward_objectives_and_their_gradients(objective, expected, slope):
    config = load_config(None, [f"prfl.objective={objective}", "prfl.margin=2"]).prfl
    logits = torch.tensor([0.5, -3.0], requires_grad=True)
    loss = reward_loss(logits, config)
    loss.backward()
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert logits.grad.tolist() == pytest.approx(slope, rel=1e-5)
    if objective == "hinge":  # no push once the logit clears the margin
        assert reward_loss(torch.tensor([5.0]), config).item() == 0


def test_the_reference_objective_never_clips_and_fades_when_the_reward_model_is_confident():
    config = load_config(None, ["prfl.objective=reference", "prfl.weight=0.1"]).prfl
    logits = torch.tensor([0.0, 8.0], requires_grad=True)
    reward_loss(logits, config).backward()
    assert logits.grad[0].item() == pytest.approx(-0.1 * 0.25 / 2)  # relu(2 - sigmoid) is just 2 - sigmoid
    assert abs(logits.grad[1].item()) < 1e-4  # the gradient vanishes once sigmoid(logit) saturates


def frozen_reward(seed: int = 1) -> RewardModel:
    torch.manual_seed(seed)
    model = RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)), randomized_dit("tiny", seed=seed,
                                                                                               num_layers=1))
    return model.requires_grad_(False).eval()


def batch() -> dict:
    return {"latents": torch.zeros(1, 16, 2, 4, 4), "context": torch.randn(1, 5, 32,
                                                                           generator=torch.Generator().manual_seed(3))}


def prfl_step(k: int, **overrides) -> PRFLStep:
    config = load_config(None, ["sampling.steps=4", "sampling.solver=euler",
                                *[f"prfl.{key}={value}" for key, value in overrides.items()]])
    return PRFLStep(config.prfl, config.sampling, frozen_reward(), step_override=k)


class RolloutWith(torch.nn.Module):
    """The rollout (no gradients) evaluates `rollout`, the gradient step `model`: PRFL's gradient holds x_k fixed,
    so the finite-difference reference perturbs the weights of step k only."""

    def __init__(self, rollout, model) -> None:
        super().__init__()
        self.rollout, self.model = rollout, model

    def forward(self, *args, **kwargs):
        return (self.model if torch.is_grad_enabled() else self.rollout)(*args, **kwargs)


def directional_derivatives(generator, step, batch: dict, eps: float) -> tuple[float, float]:
    """The step's loss differentiated along one unit direction in weight space, from the gradients in
    `generator.*.grad` and by central differences of step k's weights (the rollout keeps the unperturbed ones).
    The direction is half the claimed gradient, half random: a wrong gradient misses it."""

    def unit(tensors: dict) -> dict:
        norm = sum(t.square().sum() for t in tensors.values()).sqrt()
        return {n: t / norm for n, t in tensors.items()}

    gradient = unit({n: p.grad for n, p in generator.named_parameters()})
    noise = unit({n: torch.randn_like(p) for n, p in generator.named_parameters()})
    direction = unit({n: gradient[n] + noise[n] for n in gradient})
    analytic = sum((p.grad * direction[n]).sum() for n, p in generator.named_parameters()).item()

    def loss_at(scale: float) -> float:
        perturbed = copy.deepcopy(generator)
        with torch.no_grad():
            for n, p in perturbed.named_parameters():
                p.add_(scale * direction[n])
        return step(RolloutWith(generator, perturbed), batch, SampleRandomness(0, [0]))[0].item()

    return analytic, (loss_at(eps) - loss_at(-eps)) / (2 * eps)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_gradient_through_step_k_matches_finite_differences(k):
    generator = randomized_dit("tiny", num_layers=1)
    step = prfl_step(k)
    loss, _ = step(generator, batch(), SampleRandomness(0, [0]))
    loss.backward()
    # small: near sigma 0 the reward is far from linear; the fp32 DiT still resolves it to ~1e-4
    analytic, numeric = directional_derivatives(generator, step, batch(), eps=1e-3)
    assert analytic == pytest.approx(numeric, rel=1e-2)
    assert abs(analytic) > 1e-3  # the check has something to compare


def test_the_rollout_keeps_no_activations_and_the_reward_model_stays_frozen():
    generator = randomized_dit("tiny", num_layers=1)
    saved_per_k = []
    for k in (0, 3):
        count = [0]

        def pack(tensor):
            count[0] += 1
            return tensor

        step = prfl_step(k)
        before = {n: p.clone() for n, p in step.reward_model.named_parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, metrics = step(generator, batch(), SampleRandomness(0, [0]))
        loss.backward()
        saved_per_k.append(count[0])
        assert metrics["reward/step_fraction"].item() == k / 4
        for name, p in step.reward_model.named_parameters():
            assert p.grad is None and torch.equal(p, before[name]), name
        generator.zero_grad()
    assert saved_per_k[0] == saved_per_k[1]  # three rollout steps before k = 3 saved nothing for backward


def test_an_unfrozen_reward_model_is_refused():
    config = load_config(None, [])
    with pytest.raises(ValueError, match="must be frozen"):
        PRFLStep(config.prfl, config.sampling, frozen_reward().requires_grad_(True))


def test_unipc_rollouts_differentiate_through_the_solvers_step():
    generator = randomized_dit("tiny", num_layers=1)
    config = load_config(None, ["sampling.steps=4", "sampling.solver=unipc", "prfl.rollout_guidance=3"])
    step = PRFLStep(config.prfl, config.sampling, frozen_reward(), null_context=torch.zeros(1, 32), step_override=2)
    loss, _ = step(generator, batch(), SampleRandomness(0, [0]))
    loss.backward()
    assert all(p.grad is not None for p in generator.blocks.parameters())


def test_the_step_index_draw_is_shared_by_all_ranks_of_a_micro_batch():
    rank0, rank1 = SampleRandomness(0, [0, 1], micro_batch=5), SampleRandomness(0, [2, 3], micro_batch=5)
    assert rank0.shared_rand() == rank1.shared_rand()
    assert SampleRandomness(0, [0], micro_batch=6).shared_rand() != SampleRandomness(0, [0], micro_batch=5).shared_rand()


def test_the_combined_step_is_the_reward_loss_plus_the_weighted_sft_loss():
    from engine.steps.feedback import FeedbackWithSFTStep
    from engine.steps.sft import SFTStep

    generator = randomized_dit("tiny", num_layers=1)
    config = load_config(None, ["sampling.steps=4", "sft.text_dropout=0.5"])
    reward_step = PRFLStep(config.prfl, config.sampling, frozen_reward(), step_override=2)
    sft_step = SFTStep(config.sft, torch.zeros(1, 32))
    two = {k: torch.cat([v, v]) for k, v in batch().items()}
    total, metrics = FeedbackWithSFTStep(reward_step, sft_step, 0.3)(generator, two, SampleRandomness(0, [0, 1]))

    rng = SampleRandomness(0, [0, 1])  # the same draws, in the same order: rollout noise, then the SFT's
    reward_loss_alone, _ = reward_step(generator, two, rng)
    sft_loss_alone, _ = sft_step(generator, two, rng)
    torch.testing.assert_close(metrics["loss/reward"], reward_loss_alone.detach())
    torch.testing.assert_close(metrics["loss/sft"], sft_loss_alone.detach())
    torch.testing.assert_close(total, reward_loss_alone + 0.3 * sft_loss_alone)


def test_a_model_sampled_in_inference_mode_still_trains():
    from engine.model.flow import sample

    generator = randomized_dit("tiny", num_layers=1)
    x = batch()
    noise = torch.randn(1, 16, 2, 4, 4)
    sample(lambda x_t, t, c: generator(x_t, t, c), noise, x["context"], steps=2)  # builds the rotary cache
    generator(noise, torch.tensor([500.0]), x["context"]).sum().backward()
    assert generator.blocks[0].self_attn.q.weight.grad is not None
