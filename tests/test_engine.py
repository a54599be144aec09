"""The DeepSpeed engine end to end on CPU ranks (gloo), started with DeepSpeed's real launcher.

Every multi-rank claim is checked against a single-rank run of the same global batch. Tolerances: fp32 throughout;
losses agree to 1e-6 relative and weights to 1e-5 absolute (the only differences are summation orders). A resumed
run agrees with the uninterrupted one to 1e-6 absolute: repeated uninterrupted runs are bit-identical, but DeepSpeed's
CPU Adam recomputes beta^t with pow() after a load instead of continuing its running product.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch
from engine.model.dit import DiT, DiTConfig
from engine.model.weights import load_dit

SFT = "runners/sft.py"
# 6 optimizer steps at a learning rate that moves the tiny model visibly; checkpoints every 2 steps.
COMMON = ["--ds_config", "ds_configs/z3_offload.json", "train.steps=6", "train.save_every=2", "train.lr=1e-3"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss/sft"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def exported(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step_{step:06d}/model/diffusion_pytorch_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Reference runs with a global batch of 2: one rank x 2 samples, and two ZeRO-3 ranks x 1 sample."""
    base = tmp_path_factory.mktemp("runs")
    launch(1, SFT, *COMMON, f"output_dir={base / 'one'}", "train.micro_batch_size=2")
    launch(2, SFT, *COMMON, f"output_dir={base / 'two'}", "train.micro_batch_size=1")
    return {"one": base / "one", "two": base / "two", "base": base}


def test_zero3_two_ranks_match_one_rank(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-6)
    torch.manual_seed(0)  # the trainer's initialisation (run seed 0)
    initial = DiT(DiTConfig.preset("tiny")).state_dict()
    final_one, final_two = exported(runs["one"], 6), exported(runs["two"], 6)
    assert max_diff(final_one, initial) > 1e-3  # training moved the weights
    assert max_diff(final_one, final_two) <= 1e-5


def test_run_folder_records_config_ds_config_and_commit(runs):
    run = runs["two"]
    config = json.loads((run / "ds_config.json").read_text())
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["train_batch_size"] == 2
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is False
    assert "train:" in (run / "config.yaml").read_text()
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and len(info["git_commit"]) >= 7


def test_only_the_last_checkpoints_are_kept(runs):
    kept = sorted(p.name for p in (runs["one"] / "checkpoints").glob("step_*"))
    assert kept == ["step_000004", "step_000006"]  # train.keep_last defaults to 2
    assert all((runs["one"] / "checkpoints" / name / "COMPLETE").exists() for name in kept)
    assert not list((runs["one"] / "checkpoints").glob("*/*ema*"))  # EMA off by default: no EMA state or export


def test_sequence_parallel_training_matches_one_rank(runs):
    """sp_size=2 on 2 ranks (75 tokens: padded) against the single-rank run with the same global batch."""
    run = runs["base"] / "sp2"
    launch(2, SFT, *COMMON, f"output_dir={run}", "train.micro_batch_size=2", "parallel.sp_size=2")
    assert losses(run) == pytest.approx(losses(runs["one"]), rel=1e-6)
    assert max_diff(exported(run, 6), exported(runs["one"], 6)) <= 1e-5


def test_ulysses_output_and_gradients_match_single_rank():
    done = launch(2, "tests.distributed.ulysses_parity")
    assert done.stdout.count("output max abs err") == 4  # two presets on two ranks


def test_export_reproduces_the_engine_model(tmp_path):
    done = launch(2, "tests.distributed.export_parity", "--run_dir", str(tmp_path / "run"))
    assert "export vs engine max abs err" in done.stdout


def test_sigkill_between_checkpoints_then_resume_auto(runs):
    run = runs["base"] / "killed"
    args = [*COMMON, f"output_dir={run}", "train.micro_batch_size=2"]
    killed = launch(1, "tests.distributed.sft_with_fault", "--kill-after-step", "3", *args, check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002"]
    resumed = launch(1, SFT, *args, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "step_000002 at step 2" in resumed.stdout
    assert losses(run)[-3:] == pytest.approx(losses(runs["one"])[-3:], rel=1e-6)
    assert max_diff(exported(run, 6), exported(runs["one"], 6)) <= 1e-6


def test_sigkill_while_saving_loses_only_that_checkpoint(runs):
    run = runs["base"] / "killed_saving"
    args = [*COMMON, f"output_dir={run}", "train.micro_batch_size=2"]
    killed = launch(1, "tests.distributed.sft_with_fault", "--kill-during-save", "4", *args, check=False)
    assert killed.returncode != 0
    partial = run / "checkpoints/step_000004"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    resumed = launch(1, SFT, *args, "--resume", "auto")
    assert "step_000002 at step 2" in resumed.stdout
    assert max_diff(exported(run, 6), exported(runs["one"], 6)) <= 1e-6


def test_universal_checkpoint_resumes_on_fewer_ranks(runs):
    """A 2-rank checkpoint, converted with DeepSpeed's ds_to_universal, resumed on 1 rank, ends where 2 ranks did."""
    source = runs["two"] / "checkpoints/step_000004"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                    "--output_folder", str(source / "universal")], check=True, capture_output=True, timeout=300)
    run = runs["base"] / "universal"
    resumed = launch(1, SFT, *COMMON, f"output_dir={run}", "train.micro_batch_size=2", "--resume", str(source))
    assert "at step 4" in resumed.stdout
    assert max_diff(exported(run, 6), exported(runs["two"], 6)) <= 1e-5


def test_convert_consolidates_and_verifies(runs, tmp_path):
    done = subprocess.run([sys.executable, "runners/convert.py", str(runs["two"] / "checkpoints/step_000006"),
                           str(tmp_path / "converted")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verified by reloading" in done.stdout
    converted = load_dit(tmp_path / "converted").state_dict()
    torch.testing.assert_close(converted, exported(runs["two"], 6), rtol=0, atol=0)


def test_sp_size_that_does_not_divide_the_world_fails_before_work(tmp_path):
    done = launch(2, SFT, "--ds_config", "ds_configs/z3_offload.json", f"output_dir={tmp_path / 'run'}",
                  "parallel.sp_size=3", check=False)
    assert done.returncode != 0
    assert "parallel.sp_size=3 must divide the world size 2" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
