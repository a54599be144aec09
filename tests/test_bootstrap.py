"""The embedded default of the main command: `runners/synthetic.py bootstrap` trains the synthetic benchmark's base
generator and PAVRM with the project's recipes; `runners/prfl.py` without --config bootstraps what is missing,
trains, and reports before / after on held-out pairs in summary.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_deepspeed_ops, launch
from engine.config_io import load_config
from engine.errors import BootstrapError, ConfigError
from engine.model.dit import DiTConfig
from engine.model.reward import RewardModel
from engine.model.weights import load_dit
from engine.synthetic.bootstrap import ensure_assets

# Tiny budgets for both bootstrap trainers (the recipes' own are minutes long).
TINY = ["train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=0", "train.eval_every=0",
        "data.val_num_samples=8"]


def main_command(assets: Path, run: Path) -> subprocess.CompletedProcess:
    """The README's main command (no --config) on one rank, with tiny budgets and temporary folders."""
    return launch(1, "runners/prfl.py", "--ds_config", "ds_configs/z3_offload.json", f"model.path={assets / 'base'}",
                  f"reward.path={assets / 'pavrm'}", f"output_dir={run}", "train.steps=2", "sampling.steps=2",
                  "eval.held_out_pairs=4", "eval.batch_size=4", f"bootstrap.overrides=[{', '.join(TINY)}]")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("assets")
    build_deepspeed_ops()
    subprocess.run([sys.executable, "runners/synthetic.py", "bootstrap", "--out", str(out), "--work",
                    str(out.parent / "work"), *TINY], cwd=ROOT, check=True, timeout=300)
    return out


def test_bootstrap_writes_a_loadable_generator_and_a_reward_model_with_its_trunk(assets):
    base = load_dit(assets / "base")
    reward = RewardModel.from_pretrained(assets / "pavrm")
    assert base.config == DiTConfig.preset("synthetic") and reward.config.blocks == 2  # the recipes' preset, K = 2
    # the PAVRM's trunk starts from the base generator: its frozen embeddings are the generator's
    for name in ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight"):
        torch.testing.assert_close(reward.trunk.state_dict()[name], base.state_dict()[name], rtol=0, atol=0)
    assert not list(assets.glob(".*"))  # no staging folder left behind
    pavrm_run = load_config(assets.parent / "work/pavrm/config.yaml")  # the recipe with bootstrap.reward_overrides
    assert pavrm_run.data.synthetic_varied_looks
    assert not load_config(ROOT / "configs/pavrm-synthetic.yaml").data.synthetic_varied_looks


def test_each_base_recipe_starts_from_the_one_before(assets):
    work = assets.parent / "work"
    first, second = (load_config(work / f"base-{stage}/config.yaml") for stage in (0, 1))
    assert first.data.synthetic_motions == ["smooth"] and first.model.path is None
    assert second.data.synthetic_motions is None  # the even mix of the four kinds
    assert Path(second.model.path) == work / "base-0/checkpoints/step_000002/model"
    torch.testing.assert_close(load_dit(assets / "base").state_dict(),
                               load_dit(work / "base-1/checkpoints/step_000002/model").state_dict())


def test_main_command_bootstraps_trains_and_reports_before_and_after(tmp_path):
    done = main_command(tmp_path / "assets", tmp_path / "run")
    assert ("base missing: training it with runners/sft.py --config configs/synthetic-base-smooth.yaml then "
            "configs/synthetic-base.yaml") in done.stdout
    assert "pavrm missing: training it with runners/pavrm.py --config configs/pavrm-synthetic.yaml" in done.stdout
    load_dit(tmp_path / "assets/base")
    RewardModel.from_pretrained(tmp_path / "assets/pavrm")
    trained = load_dit(tmp_path / "run/checkpoints/step_000002/model")
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(),
                                                      load_dit(tmp_path / "assets/base").parameters()))
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert (summary["before"]["step"], summary["after"]["step"]) == (0, 2)
    for when in ("before", "after"):
        result = summary[when]
        assert result["samples"] == 4
        assert isinstance(result["reward_mean"], float)
        for key in ("pass_rate", "detected_rate", "tracked_rate"):
            assert 0.0 <= result[key] <= 1.0, key
        # no spread where the judge finds no object (a 2-step base): null, and then no ratio either
        assert result["trajectory_spread_px"] is None or result["trajectory_spread_px"] >= 0
        assert len(list((tmp_path / f"run/held_out/step_{result['step']:06d}").glob("*.safetensors"))) == 4
    spreads = [summary[w]["trajectory_spread_px"] for w in ("before", "after")]
    if None in spreads or spreads[0] == 0:
        assert summary["diversity_ratio"] is None
    else:
        assert summary["diversity_ratio"] == pytest.approx(spreads[1] / spreads[0])
    assert "held-out before" in done.stdout and "diversity after / before" in done.stdout


def test_existing_assets_are_used_as_they_are(assets, tmp_path):
    stamps = {p: p.stat().st_mtime_ns for p in assets.rglob("*")}
    done = main_command(assets, tmp_path / "run")
    assert "missing" not in done.stdout
    assert not (tmp_path / "run/bootstrap").exists()
    assert {p: p.stat().st_mtime_ns for p in assets.rglob("*")} == stamps
    assert (tmp_path / "run/summary.json").is_file()


def test_a_waiting_rank_gives_up_with_a_named_error(tmp_path, monkeypatch):
    config = load_config(ROOT / "configs/prfl-synthetic.yaml", [f"model.path={tmp_path / 'base'}",
                                                                 f"reward.path={tmp_path / 'pavrm'}",
                                                                 "bootstrap.wait_minutes=0.0001"])
    monkeypatch.setenv("RANK", "1")  # not rank 0: waits for rank 0's folders instead of training them
    with pytest.raises(BootstrapError, match="bootstrap.wait_minutes"):
        ensure_assets(config)


def test_bootstrap_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="bootstrap.enabled=true needs model.path and reward.path"):
        load_config(None, ["bootstrap.enabled=true"])
    with pytest.raises(ConfigError, match="bootstrap.overrides: 'train.steps' is not key=value"):
        load_config(None, ["bootstrap.overrides=[train.steps]"])
    with pytest.raises(ConfigError, match="bootstrap.reward_overrides: 'bt' is not key=value"):
        load_config(None, ["bootstrap.reward_overrides=[bt]"])
    with pytest.raises(ConfigError, match="bootstrap.base_recipes is empty"):
        load_config(None, ["bootstrap.base_recipes=[]"])
    assert load_config(ROOT / "configs/prfl-synthetic.yaml").bootstrap.enabled


def test_the_first_frame_recipe_bootstraps_i2v_models_trains_and_reports_adherence(tmp_path):
    """configs/prfl-synthetic-i2v.yaml end to end with tiny budgets: an i2v base generator and PAVRM bootstrapped by
    their own recipes, PRFL, and the before / after report with first-frame adherence and 95% intervals."""
    assets, run = tmp_path / "assets", tmp_path / "run"
    done = launch(1, "runners/prfl.py", "--ds_config", "ds_configs/z3_offload.json", "--config",
                  "configs/prfl-synthetic-i2v.yaml", f"model.path={assets / 'base'}", f"reward.path={assets / 'pavrm'}",
                  f"output_dir={run}", "train.steps=2", "sampling.steps=2", "eval.held_out_pairs=4",
                  "eval.batch_size=4", f"bootstrap.overrides=[{', '.join(TINY)}]")
    assert "configs/synthetic-i2v-base-smooth.yaml then configs/synthetic-i2v-base.yaml" in done.stdout
    assert load_dit(assets / "base").config == DiTConfig.preset("synthetic-i2v")
    assert RewardModel.from_pretrained(assets / "pavrm").trunk.config.model_type == "i2v"
    pavrm_run = load_config(run / "bootstrap/pavrm/config.yaml")
    assert "wrong_start" in pavrm_run.data.synthetic_motions  # the PAVRM learns to check the start
    summary = json.loads((run / "summary.json").read_text())
    for when in ("before", "after"):
        result = summary[when]
        assert 0.0 <= result["first_frame_rate_ci95_low"] <= result["first_frame_rate"] <= \
            result["first_frame_rate_ci95_high"] <= 1.0
        assert 0.0 <= result["pass_rate_ci95_low"] <= result["pass_rate"] <= result["pass_rate_ci95_high"] <= 1.0
    spreads = [summary[w]["motion_spread_px"] for w in ("before", "after")]  # the condition fixes the start
    if None not in spreads and spreads[0]:
        assert summary["diversity_ratio"] == pytest.approx(spreads[1] / spreads[0])
    # its generator's samples keep their condition, which the judge reads
    subprocess.run([sys.executable, "runners/synthetic.py", "sample", "--model", str(assets / "base"), "--out",
                    str(tmp_path / "samples"), "--pairs", "4", "--steps", "2"], cwd=ROOT, check=True, timeout=300)
    judged = subprocess.run([sys.executable, "runners/synthetic.py", "judge", str(tmp_path / "samples")], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=300)
    assert "first_frame_rate" in json.loads(judged.stdout)
