"""The RGB ReFL baseline (engine/refl_rgb.py) on tiny diffusers / transformers models built here, and the benchmark
scripts end to end in smoke mode (their figures are never asserted)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, build_deepspeed_ops, randomized_dit
from engine.config import ConfigError, RGBReFLConfig, load_config
from engine.data import SampleRandomness
from engine.refl_rgb import (TINY_CLIP, TINY_PIXELS, TINY_QWEN2_VL, TINY_VAE, ImageReward, VideoReward,
                             build_rgb_refl_step, build_vae, decode)
from engine.reward import RewardModel, RewardModelConfig


def tiny_rgb_config(frames: str, **overrides) -> RGBReFLConfig:
    return RGBReFLConfig(frames=frames, random_weights=True, vae_config=TINY_VAE,
                         reward_config=TINY_CLIP if frames == "first" else TINY_QWEN2_VL, min_pixels=TINY_PIXELS[0],
                         max_pixels=TINY_PIXELS[1], **overrides)


@pytest.mark.parametrize("frames", ["first", "all"])
def test_gradients_reach_the_generator_through_the_decoder_and_the_frozen_reward_model(frames):
    run = load_config(None, ["sampling.steps=4", "sampling.solver=euler"])
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
    for frozen in (step.reward_model, step.vae.model):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())


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


def run_script(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_step_benchmark_runs_end_to_end_in_smoke_mode(tmp_path):
    build_deepspeed_ops()  # CPU Adam, built once for the case processes
    run_script("benchmarks/step_memory_speed.py", "--smoke", "--methods", "prfl", "rgb_all", "--tuning", "lora",
               "--sft", "on", "--out", str(tmp_path))
    report = json.loads((tmp_path / "step-cpu.json").read_text())
    assert [(r["method"], r["status"]) for r in report["results"]] == [("prfl", "ok"), ("rgb_all", "ok")]
    assert set(report["results"][1]["phases_s"]) >= {"rollout", "gradient_forward", "reward", "decode", "backward"}
    assert (tmp_path / "step-cpu.md").read_text().count("| tiny | smoke |") == 2
    assert (tmp_path / "step-cpu.png").stat().st_size > 0


def test_memory_model_traces_the_steps_in_smoke_mode(tmp_path):
    run_script("benchmarks/memory_model.py", "--smoke", "--methods", "prfl_sp", "rgb_first", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("memory_model-tiny-*.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert [(r["method"], r["activation_offload"]) for r in rows] == [
        ("prfl_sp", False), ("prfl_sp", True), ("rgb_first", False), ("rgb_first", True)]
    for row in rows:  # offload parks the checkpointed block inputs on the host, and only then
        assert (row["host_activations_gb"] > 0) == row["activation_offload"]
    assert json_file.with_suffix(".md").exists()


def test_pavrm_probe_trains_the_head_on_cached_features_in_smoke_mode(tmp_path):
    out = tmp_path / "reports"  # a folder that does not exist yet: the script makes it
    run_script("benchmarks/pavrm_probe.py", "--smoke", "--out", str(out))
    report = json.loads((out / "pavrm_probe-random-sigma0-cpu.json").read_text())
    assert [(r["trunk"], r["task"]) for r in report["rows"]] == [
        (patch, task) for patch in ("1,2,2", "2,2,2")
        for task in ("smooth vs static", "smooth vs jitter", "smooth vs vanish", "all four")]
    assert (out / "pavrm_probe-random-sigma0-cpu.md").read_text().count("| 2,2,2 |") == 4


def test_pavrm_accuracy_trains_the_recipe_per_loss_in_smoke_mode(tmp_path):
    generator = tmp_path / "base"
    randomized_dit("synthetic").save_pretrained(generator)
    run_script("benchmarks/pavrm_accuracy.py", "--generator", str(generator), "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "pavrm_accuracy-cpu.json").read_text())
    assert [(run["loss"], run["step"]) for run in report["runs"]] == [("ce", 2), ("bt", 2)]
    assert all(0 <= run["accuracy (0.6,0.8]"] <= 1 for run in report["runs"])
    table = (tmp_path / "pavrm_accuracy-cpu.md").read_text()
    assert "| ce |" in table and "| bt |" in table and "(0.6,0.8]" in table


def test_prfl_stages_runs_the_default_recipe_per_stage_in_smoke_mode(tmp_path):
    build_deepspeed_ops()
    torch.manual_seed(0)
    base = randomized_dit("synthetic")
    base.save_pretrained(tmp_path / "base")
    trunk = randomized_dit("synthetic", num_layers=1)
    RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)), trunk).save_pretrained(tmp_path / "pavrm")
    run_script("benchmarks/prfl_stages.py", "--base", str(tmp_path / "base"), "--reward", str(tmp_path / "pavrm"),
               "--stages", "all", "last_quarter", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "prfl_stages-cpu.json").read_text())
    assert [(run["stage"], run["before"]["step"], run["after"]["step"]) for run in report["runs"]] == [
        ("all", 0, 2), ("last_quarter", 0, 2)]
    table = (tmp_path / "prfl_stages-cpu.md").read_text()
    assert "| base |" in table and "| all |" in table and "| last_quarter |" in table


def test_pavrm_shift_scores_rendered_speeds_and_judges_each_generator_in_smoke_mode(tmp_path):
    torch.manual_seed(0)
    randomized_dit("synthetic").save_pretrained(tmp_path / "base")
    trunk = randomized_dit("synthetic", num_layers=1)
    RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)), trunk).save_pretrained(tmp_path / "pavrm")
    run_script("benchmarks/pavrm_shift.py", "--reward", str(tmp_path / "pavrm"), "--generator",
               f"base={tmp_path / 'base'}", "--generator", f"again={tmp_path / 'base'}", "--smoke", "--out",
               str(tmp_path))
    report = json.loads((tmp_path / "pavrm_shift-cpu.json").read_text())
    assert [row["speed_px_per_frame"] for row in report["rendered"]][0] == 0.0
    assert all(row["median_logit"] is not None for row in report["rendered"])
    base, again = report["generators"]
    assert (base["name"], again["name"]) == ("base", "again")
    assert base == {**again, "name": "base"}  # the same generator on the same pairs: the same figures
    assert "| base |" in (tmp_path / "pavrm_shift-cpu.md").read_text()
    missing = subprocess.run([sys.executable, "benchmarks/pavrm_shift.py", "--reward", str(tmp_path / "nowhere"),
                              "--generator", f"base={tmp_path / 'base'}", "--smoke"], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "--reward: " in missing.stderr and "nowhere is not a folder" in missing.stderr
