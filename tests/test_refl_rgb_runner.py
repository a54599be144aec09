"""runners/prfl.py with prfl.mode=rgb_refl through DeepSpeed's launcher on one CPU rank: the pixel-space baseline
trains from a saved tiny VAE and image reward model, checkpoints, and exports the trained generator."""

import json
import math

import torch
from diffusers import AutoencoderKLWan

from conftest import launch
from engine.model.dit import DiT, DiTConfig
from engine.model.weights import load_dit
from engine.steps.rgb_refl import TINY_CLIP, TINY_VAE, ImageReward


def test_rgb_refl_mode_trains_the_generator_and_exports_it(tmp_path):
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(tmp_path / "vae")
    ImageReward.random(TINY_CLIP).save_pretrained(tmp_path / "reward")
    run = tmp_path / "run"
    # No reward.path (no PAVRM) and random data: the evaluations sample videos but have nothing to score them.
    launch(1, "runners/prfl.py", "--config", "configs/tiny.yaml", "--ds_config", "ds_configs/z2.json",
           "prfl.mode=rgb_refl", f"rgb_refl.vae_path={tmp_path / 'vae'}", f"rgb_refl.reward_path={tmp_path / 'reward'}",
           "train.steps=2", "train.lr=1e-3", "train.log_every=1", "train.eval_every=2", "eval.samples=1",
           "sampling.steps=4", "prfl.stage=last_quarter", "prfl.sft_weight=0.5", f"output_dir={run}")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the step-0 evaluation ran (its videos are written) but, scoring nothing, logged no record of its own
    assert (run / "samples/step_000000/index.jsonl").is_file()
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        # RGB ReFL as published: k in the last quarter of the 4-step chain, k = 3, the chain's late stage
        assert record["reward/step_fraction"] == 0.75
        for key in ("loss/reward", "reward/logit_mean", "reward/logit_late", "loss/sft", "loss/total"):
            assert math.isfinite(record[key]), key

    model = load_dit(run / "checkpoints/step_000002/model")
    torch.manual_seed(0)  # the trainer's initial weights: the tiny preset built after seeding with `seed` (0)
    initial = DiT(DiTConfig.preset("tiny"))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
