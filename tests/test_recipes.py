"""The Wan2.1-I2V-14B recipes (PAVRM with CE and BT, PRFL; 480P and 720P): each loads, and its --dry-run prints the
resolved config and a memory estimate on 8 ranks without any weights, against one-sample datasets of its shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from engine.data.format import write_list, write_sample

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
RECIPES = [(f"{kind}-wan2.1-i2v-14b-{res}.yaml", kind, res) for kind in ("pavrm-ce", "pavrm-bt", "prfl")
           for res in LATENTS]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Per resolution, a list of two i2v samples of Wan2.1-I2V-14B's shapes: one pair, labelled."""
    lists = {}
    for res, shape in LATENTS.items():
        root = tmp_path_factory.mktemp(res)
        metas = [write_sample(root, f"clip{i}", {"latents": torch.zeros(16, *shape), "context": torch.zeros(8, 4096),
                                                 "clip_fea": torch.zeros(257, 1280), "y": torch.zeros(20, *shape)},
                              {"prompt": "a dog runs", "motion_quality": i, "pair_id": "p0", "preferred": bool(i)})
                 for i in range(2)]
        lists[res] = write_list(root, "all", metas, torch.zeros(1, 4096))
    return lists


@pytest.mark.parametrize("recipe, kind, res", RECIPES, ids=[r[0] for r in RECIPES])
def test_i2v_14b_recipe_dry_run_prints_its_config_and_memory_estimate_without_weights(datasets, recipe, kind, res):
    runner = "runners/prfl.py" if kind == "prfl" else "runners/pavrm.py"
    data = [f"data.list_file={datasets[res]}", f"data.val_list_file={datasets[res]}"]
    done = subprocess.run([sys.executable, runner, "--config", f"configs/{recipe}", "--ds_config",
                           "ds_configs/z3_offload.json", "--dry-run", *data], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WORLD_SIZE": "8", "RANK": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    config_text, report_text = done.stdout.split("# dry run\n")
    config = yaml.safe_load(config_text.split("# resolved config\n")[1])
    report = json.loads(report_text)
    assert config["model"]["preset"] == "wan2.1-i2v-14b" and config["model"]["path"] is None
    assert (report["world_size"], report["sp_size"], report["dp_size"]) == (8, 4, 2)
    f, h, w = LATENTS[res]
    assert report["tokens"] == f * h * w // 4 and report["tokens_per_rank"] == report["tokens"] // 4
    if kind == "prfl":
        assert report["parameters"] == 16_394_878_784  # the whole I2V-14B generator, sized on the meta device
        assert report["reward_model"].startswith("reward.model")  # no PAVRM trained yet: its architecture
        assert report["frozen_parameters"] > 8 / 40 * report["parameters"] * 0.9  # 8 of the 40 blocks
        assert report["model_states_gpu_gb"] > 0 and report["block_checkpoints_gb"] > 0
    else:
        assert report["loss"] == kind.removeprefix("pavrm-") and report["trunk_blocks"] == 8
        assert report["training_samples"] == (2 if kind == "pavrm-ce" else 1)  # two labelled clips, one pair
