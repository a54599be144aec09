"""PAVRM training through DeepSpeed's launcher on CPU ranks: multi-rank vs single-rank, sequence parallelism,
validation output and the exported reward model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch
from engine.model.reward import RewardModel
from engine.steps.reward import INTERVALS, interval_name

PAVRM = "runners/pavrm.py"
# A few ZeRO-3 steps on the synthetic benchmark, global batch 4, validated on 8 held-out samples at the end. The
# pooling at attention_scale 1: the recipe's sharper softmax also sharpens summation-order noise (below).
COMMON = ["--ds_config", "ds_configs/z3_offload.json", "train.steps=3", "train.lr=1e-3", "reward.head_lr=1e-3",
          "train.log_every=1", "train.eval_every=3", "data.val_num_samples=64", "data.num_samples=200",
          "reward.model.mlp_dims=[32,16]", "reward.model.attention_scale=1"]


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/pavrm"] for r in records if r["step"] > 0]  # step 0: the validation before training


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pavrm")
    launch(1, PAVRM, *COMMON, f"output_dir={base / 'one'}", "train.micro_batch_size=4")
    launch(2, PAVRM, *COMMON, f"output_dir={base / 'two'}", "train.micro_batch_size=2")
    return {"base": base, "one": base / "one", "two": base / "two"}


def test_two_ranks_train_the_same_reward_model_as_one(runs):
    """The head is an engine parameter: averaged and updated like the trunk, identical on every rank."""
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=1e-6)
    one = load_file(runs["one"] / "checkpoints/step_000003/model/head.safetensors")
    two = load_file(runs["two"] / "checkpoints/step_000003/model/head.safetensors")
    # Adam turns summation-order differences of near-zero gradients into visible steps; the head moves by
    # ~3e-3 in 3 steps, so 1e-5 is far below what a wrong reduction would give.
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5


def test_validation_reports_every_interval_and_their_mean(runs):
    one = json.loads((runs["one"] / "validation.json").read_text())
    two = json.loads((runs["two"] / "validation.json").read_text())
    names = [interval_name(i) for i in INTERVALS]
    assert [f"accuracy {n}" in one for n in names] == [True] * 5 and "auc all" in one
    assert one["accuracy mean"] == pytest.approx(sum(one[f"accuracy {n}"] for n in names) / 5)
    # Data-parallel ranks split the held-out samples; the gathered result is the single-rank one.
    for key in one:
        if key.startswith(("accuracy", "auc")):
            assert two[key] == pytest.approx(one[key], abs=1e-6, nan_ok=True), key
    assert one["samples"] == 64
    logged = [json.loads(line) for line in (runs["one"] / "metrics.jsonl").read_text().splitlines()]
    assert "val/accuracy mean" in logged[-1]


def test_the_export_is_a_loadable_reward_model_and_only_the_trained_parts_moved(runs):
    model = RewardModel.from_pretrained(runs["one"] / "checkpoints/step_000003/model")
    torch.manual_seed(0)  # the runner's initial weights: seed 0, the recipe's synthetic preset, 2 blocks
    from engine.model.dit import DiT, DiTConfig
    from engine.model.reward import RewardModelConfig

    initial = RewardModel(RewardModelConfig(blocks=2, mlp_dims=(32, 16)),
                          DiT(DiTConfig.preset("synthetic", num_layers=2)))
    for name, value in initial.state_dict().items():
        moved = not torch.equal(model.state_dict()[name], value)
        assert moved == name.startswith(("trunk.blocks.", "pool.", "mlp.")), name


def test_convert_writes_a_reward_checkpoint_as_the_trainer_exports_it(runs, tmp_path):
    """runners/convert.py and the trainer share one export: a PAVRM run's checkpoint converts to its model folder."""
    done = subprocess.run([sys.executable, "-m", "runners.convert", str(runs["one"] / "checkpoints/step_000003"),
                           str(tmp_path / "converted")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a reward model" in done.stdout and "verified by reloading" in done.stdout
    converted = RewardModel.from_pretrained(tmp_path / "converted").state_dict()
    exported = RewardModel.from_pretrained(runs["one"] / "checkpoints/step_000003/model").state_dict()
    torch.testing.assert_close(converted, exported, rtol=0, atol=0)


def test_bt_training_runs_on_preference_pairs(runs):
    run = runs["base"] / "bt"
    launch(1, PAVRM, *COMMON, f"output_dir={run}", "train.micro_batch_size=2", "reward.loss=bt",
           "data.val_num_samples=100")  # 52 held-out pairs
    record = json.loads((run / "validation.json").read_text())
    assert record["loss"] == "bt" and 0.0 <= record["accuracy mean"] <= 1.0


def test_sequence_parallel_reward_matches_one_rank():
    done = launch(2, "tests.distributed.reward_sp_parity")
    assert done.stdout.count("logits max abs err") == 4  # two head configurations on two ranks


def test_sequence_parallel_reward_training_matches_one_rank(runs):
    run = runs["base"] / "sp2"
    launch(2, PAVRM, *COMMON, f"output_dir={run}", "train.micro_batch_size=4", "parallel.sp_size=2")
    sp, one = losses(run), losses(runs["one"])
    assert len(sp) == 3 and sp[0] == pytest.approx(one[0], rel=1e-6)  # same weights: the forward matches
    assert sp == pytest.approx(one, rel=1e-5)  # later steps: the gradients (pooled across ranks) match too
