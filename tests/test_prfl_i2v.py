"""PRFL for image-to-video on the tiny i2v DiT: the gradient through step k against finite differences in float64,
the image condition reaching every model evaluation (rollout, both guidance branches, step k, the SFT part and the
reward model), ZeRO-3 and sequence parallelism against one rank, and a reward model of the other task refused."""

import subprocess
import sys

import pytest
import torch
from test_prfl import directional_derivatives
from test_prfl_engine import metrics

from conftest import ROOT, launch, randomized_dit
from engine.config_io import load_config
from engine.errors import ConfigError
from engine.model.dit import DiT, DiTConfig
from engine.model.reward import RewardModel, RewardModelConfig
from engine.steps.feedback import FeedbackWithSFTStep
from engine.steps.prfl import PRFLStep, check_reward_model
from engine.steps.sft import SFTStep
from engine.train.randomness import SampleRandomness


def i2v_batch(size: int = 1, seed: int = 3, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.zeros(size, 16, 2, 4, 4, dtype=dtype),
            "context": torch.randn(size, 5, 32, generator=g).to(dtype),
            "clip_fea": torch.randn(size, 257, 48, generator=g).to(dtype),
            "y": torch.randn(size, 20, 2, 4, 4, generator=g).to(dtype)}


def i2v_reward(seed: int = 1) -> RewardModel:
    torch.manual_seed(seed)
    trunk = randomized_dit("tiny-i2v", seed=seed, num_layers=1)
    return RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)), trunk).requires_grad_(False).eval()


def step_at(k: int, reward: RewardModel, *overrides: str) -> PRFLStep:
    config = load_config(None, ["sampling.steps=4", "sampling.solver=euler", *overrides])
    return PRFLStep(config.prfl, config.sampling, reward, null_context=torch.zeros(1, 32), step_override=k)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_gradient_through_step_k_matches_finite_differences_in_float64(k):
    generator = randomized_dit("tiny-i2v", num_layers=1).double()
    step = step_at(k, i2v_reward().double())
    batch = i2v_batch(dtype=torch.float64)
    loss, _ = step(generator, batch, SampleRandomness(0, [0]))
    assert loss.dtype == torch.float64
    loss.backward()
    torch.manual_seed(5)  # the random half of the direction
    analytic, numeric = directional_derivatives(generator, step, batch, eps=1e-5)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    assert abs(analytic) > 1e-4  # the check has something to compare


class Recorder(torch.nn.Module):
    """A model that records the conditioning of every evaluation it makes."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, context, clip_fea=None, y=None, **kwargs):
        self.calls.append({"batch": len(x), "clip_fea": clip_fea, "y": y, "context": context})
        return self.model(x, t, context, clip_fea=clip_fea, y=y, **kwargs)


def test_the_image_condition_reaches_every_evaluation_and_the_reward_model():
    generator = Recorder(randomized_dit("tiny-i2v", num_layers=1))
    reward = Recorder(i2v_reward())
    reward.requires_grad_(False)
    config = load_config(None, ["sampling.steps=4", "sampling.solver=euler", "prfl.rollout_guidance=3"])
    reward_step = PRFLStep(config.prfl, config.sampling, reward, null_context=torch.zeros(1, 32), step_override=2)
    batch = i2v_batch(size=2)
    FeedbackWithSFTStep(reward_step, SFTStep(config.sft, torch.zeros(1, 32)), 0.5)(generator, batch,
                                                                                SampleRandomness(0, [0, 1]))
    # two rollout steps with guidance (each one call of the batch, conditional then unconditional), then step k:
    # conditional, unconditional and the SFT prediction batched in one evaluation
    assert [c["batch"] for c in generator.calls] == [2, 2, 2, 2, 6]
    for call in generator.calls:
        repeats = call["batch"] // 2
        torch.testing.assert_close(call["clip_fea"], batch["clip_fea"].repeat(repeats, 1, 1), rtol=0, atol=0)
        torch.testing.assert_close(call["y"], batch["y"].repeat(repeats, 1, 1, 1, 1), rtol=0, atol=0)
    # the unconditional branch drops the prompt and keeps the image
    assert not generator.calls[1]["context"].any() and generator.calls[0]["context"].any()
    (scored,) = reward.calls
    torch.testing.assert_close(scored["clip_fea"], batch["clip_fea"], rtol=0, atol=0)
    torch.testing.assert_close(scored["y"], batch["y"], rtol=0, atol=0)


def test_another_condition_changes_the_rollout_and_the_reward():
    generator = randomized_dit("tiny-i2v", num_layers=1)
    step = step_at(3, i2v_reward())
    results = []
    for seed in (3, 4):
        batch = {**i2v_batch(seed=3), "y": i2v_batch(seed=seed)["y"]}  # the same prompt, noise and image features
        rollout = step.rollout(generator, batch, SampleRandomness(0, [0]))
        loss, _ = step.reward(rollout, step.gradient_inputs(rollout)(generator))
        results.append((rollout.x, loss))
    assert not torch.allclose(results[0][0], results[1][0])
    assert results[0][1].item() != pytest.approx(results[1][1].item(), rel=1e-6)


def test_a_reward_model_of_the_other_task_is_refused_naming_both():
    i2v, t2v = DiTConfig.preset("tiny-i2v"), DiTConfig.preset("tiny")
    with pytest.raises(ConfigError, match=r"reward.path=R is a t2v reward model but model.path=G is a i2v generator"):
        check_reward_model(i2v, t2v, "model.path=G", "reward.path=R")
    with pytest.raises(ConfigError, match=r"is a i2v reward model but .* is a t2v generator"):
        check_reward_model(t2v, i2v, "model.path=G", "reward.path=R")
    check_reward_model(i2v, DiTConfig.preset("tiny-i2v", num_layers=1), "g", "r")  # same task: accepted
    with pytest.raises(ConfigError, match=r"reward.path=R reads clip_dim=48 but model.path=G has clip_dim=1280"):
        check_reward_model(DiTConfig.preset("tiny-i2v", clip_dim=1280), i2v, "model.path=G", "reward.path=R")


def test_the_runner_refuses_a_t2v_reward_model_for_an_i2v_generator_in_one_line(tmp_path):
    torch.manual_seed(0)
    RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)),
                DiT(DiTConfig.preset("tiny", num_layers=1))).save_pretrained(tmp_path / "t2v-reward")
    for extra in ([], ["--dry-run"]):
        done = subprocess.run([sys.executable, "runners/prfl.py", "--config", "configs/tiny.yaml", "--ds_config",
                               "ds_configs/z3_offload.json", "model.preset=tiny-i2v",
                               f"reward.path={tmp_path / 't2v-reward'}", f"output_dir={tmp_path / 'run'}", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: reward.path=") and "t2v reward model" in last and "i2v generator" in last


I2V = ["--config", "configs/tiny.yaml", "--ds_config", "ds_configs/z3_offload.json", "model.preset=tiny-i2v",
       "train.steps=1", "train.lr=1e-3", "sampling.steps=4", "prfl.sft_weight=0.5", "prfl.rollout_guidance=2"]


@pytest.fixture(scope="module")
def i2v_runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("prfl-i2v")
    torch.manual_seed(0)
    RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)),
                DiT(DiTConfig.preset("tiny-i2v", num_layers=1))).save_pretrained(base / "reward")
    args = [*I2V, f"reward.path={base / 'reward'}"]
    # the one-rank run also samples its fixed prompts (with their images) before and after the step
    launch(1, "runners/prfl.py", *args, f"output_dir={base / 'one'}", "train.micro_batch_size=2",
           "train.eval_every=1", "eval.samples=2")
    launch(2, "runners/prfl.py", *args, f"output_dir={base / 'two'}", "train.micro_batch_size=1")
    launch(2, "runners/prfl.py", *args, f"output_dir={base / 'sp2'}", "train.micro_batch_size=2",
           "parallel.sp_size=2")
    return {name: base / name for name in ("one", "two", "sp2")}


@pytest.mark.parametrize("layout", ["two", "sp2"])
def test_i2v_zero3_ranks_and_sequence_parallelism_give_the_first_loss_of_one_rank(i2v_runs, layout):
    (one,), (other,) = metrics(i2v_runs["one"]), metrics(i2v_runs[layout])
    assert other["reward/step_fraction"] == one["reward/step_fraction"]
    for key in ("loss/reward", "loss/sft", "loss/total"):
        assert other[key] == pytest.approx(one[key], rel=1e-5), key


def test_i2v_evaluation_samples_and_scores_its_prompts_with_their_images(i2v_runs):
    evaluations = metrics(i2v_runs["one"], evaluations=True)
    assert [r["step"] for r in evaluations] == [0, 1]
    assert all(r["val/reward_std"] >= 0 for r in evaluations)
