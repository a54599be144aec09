"""The RGB ReFL baseline (engine/steps/rgb_refl.py) on tiny diffusers / transformers models built here."""

import numpy as np
import pytest
import torch

from conftest import randomized_dit
from engine.config import RGBReFLConfig
from engine.config_io import load_config
from engine.errors import ConfigError
from engine.steps.rgb_refl import (
    TINY_CLIP,
    TINY_PIXELS,
    TINY_QWEN2_VL,
    TINY_VAE,
    ImageReward,
    VideoReward,
    build_rgb_refl_step,
    build_vae,
    decode,
)
from engine.train.randomness import SampleRandomness


def tiny_rgb_config(frames: str, **overrides) -> RGBReFLConfig:
    return RGBReFLConfig(frames=frames, random_weights=True, vae_config=TINY_VAE,
                         reward_config=TINY_CLIP if frames == "first" else TINY_QWEN2_VL, min_pixels=TINY_PIXELS[0],
                         max_pixels=TINY_PIXELS[1], **overrides)


@pytest.mark.parametrize("frames", ["first", "all"])
def test_gradients_reach_the_generator_through_the_decoder_and_the_frozen_reward_model(frames):
    run = load_config(None, ["sampling.steps=4", "sampling.solver=euler", "prfl.stage=last_quarter"])
    torch.manual_seed(0)
    step = build_rgb_refl_step(run, tiny_rgb_config(frames), "cpu", torch.float32)
    generator = randomized_dit("tiny", num_layers=1)
    batch = {"latents": torch.zeros(1, 16, 2, 2, 4), "context": torch.randn(1, 5, 32)}
    loss, metrics = step(generator, batch, SampleRandomness(0, [0]))
    loss.backward()
    assert metrics["reward/step_fraction"].item() == 0.75  # the last quarter of a 4-step chain: k = 3
    # The loss reads the generator only through decoder and reward model, so these gradients crossed both.
    for name in ("head.head.weight", "blocks.0.ffn.0.weight", "blocks.0.self_attn.q.weight"):
        assert generator.get_parameter(name).grad.abs().sum() > 0, name
    for frozen in (step.reward_model, step.scorer.vae.model):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())


def test_rgb_refl_draws_k_from_the_prfl_stage_as_prfl_does():
    """One `prfl.stage` for both methods: the step index of a 6-step chain's early third is 0 or 1, whatever the
    micro-batch's draw, and RGB ReFL's step is PRFL's reward-feedback step with another scorer."""
    from engine.steps.feedback import FeedbackStep

    run = load_config(None, ["sampling.steps=6", "sampling.solver=euler", "prfl.stage=early"])
    step = build_rgb_refl_step(run, tiny_rgb_config("first"), "cpu", torch.float32)
    assert isinstance(step, FeedbackStep) and step.name == "rgb_refl"
    generator = randomized_dit("tiny", num_layers=1)
    batch = {"latents": torch.zeros(1, 16, 2, 2, 4), "context": torch.randn(1, 5, 32)}
    with torch.no_grad():
        ks = {step.rollout(generator, batch, SampleRandomness(0, [0], micro_batch=m)).k for m in range(12)}
    assert ks == {0, 1}


def test_frame_checkpointed_decode_matches_diffusers_decode_and_its_gradient():
    torch.manual_seed(0)
    vae = build_vae(tiny_rgb_config("all"), "cpu", torch.float32)
    latents = torch.randn(1, 16, 2, 2, 2, requires_grad=True)  # 2 latent frames -> 5 video frames
    weight = torch.randn(1, 3, 5, 16, 16)
    results = []
    for checkpointing in (False, True):  # False: diffusers' own AutoencoderKLWan.decode
        frames = decode(vae, latents, checkpointing)
        (gradient,) = torch.autograd.grad((frames * weight).sum(), latents)
        results.append((frames.detach(), gradient))
    assert results[0][0].shape == (1, 3, 5, 16, 16)
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_the_video_model_reads_frames_and_patches_as_qwen2_vl_processes_them():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = VideoReward.random(TINY_QWEN2_VL, min_pixels=28 * 28, max_pixels=56 * 84)
    assert model.frame_indices(81).tolist() == list(range(0, 80, 8))  # 81 frames at 16 fps, read at 2 fps
    # An image is a video of one frame repeated over the temporal patch: both must give the same patches.
    image = (np.random.RandomState(0).rand(56, 84, 3) * 255).round().astype(np.uint8)
    expected = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84, do_resize=False)(
        images=[image], return_tensors="pt")
    frame = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    model.fps = model.sample_fps  # read every frame
    pixels, grid = model.pixel_inputs(frame[None, :, None].expand(1, 3, 2, 56, 84))
    assert list(grid) == expected.image_grid_thw[0].tolist()
    torch.testing.assert_close(pixels, expected.pixel_values, atol=1e-5, rtol=1e-5)


def test_pixel_reward_models_save_and_load_strictly(tmp_path):
    torch.manual_seed(0)
    model = ImageReward.random(TINY_CLIP).eval()
    model.save_pretrained(tmp_path / "reward")
    loaded = ImageReward.from_pretrained(tmp_path / "reward").eval()
    frames = torch.rand(2, 3, 20, 36) * 2 - 1
    torch.testing.assert_close(loaded(frames), model(frames))
    (tmp_path / "reward" / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        ImageReward.from_pretrained(tmp_path / "reward")


def test_rgb_refl_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="vae_tiling"):
        RGBReFLConfig(vae_tiling=True)
    with pytest.raises(ConfigError, match="reward_path"):
        build_rgb_refl_step(load_config(None, []), RGBReFLConfig(), "cpu", torch.float32)
