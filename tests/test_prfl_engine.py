"""PRFL training through DeepSpeed's launcher on CPU ranks: ZeRO-3 and sequence parallelism against one rank,
the same step index on every rank, and a reward model that is only read."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import launch
from engine.dit import DiT, DiTConfig
from engine.reward import RewardModel, RewardModelConfig

PRFL = "runners/prfl.py"
COMMON = ["--ds_config", "ds_configs/z3_offload.json", "train.steps=3", "train.lr=1e-3", "train.log_every=1",
          "sampling.steps=4", "prfl.sft_weight=0.5"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("prfl")
    torch.manual_seed(0)
    reward = RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)),
                         DiT(DiTConfig.preset("tiny", num_layers=1)))
    reward.save_pretrained(base / "reward")
    before = digest(base / "reward")
    args = [*COMMON, f"reward.path={base / 'reward'}"]
    launch(1, PRFL, *args, f"output_dir={base / 'one'}", "train.micro_batch_size=2")
    launch(2, PRFL, *args, f"output_dir={base / 'two'}", "train.micro_batch_size=1")
    launch(2, PRFL, *args, f"output_dir={base / 'sp2'}", "train.micro_batch_size=2", "parallel.sp_size=2")
    assert digest(base / "reward") == before  # the reward model is read, never written
    return {"one": base / "one", "two": base / "two", "sp2": base / "sp2"}


@pytest.mark.parametrize("layout", ["two", "sp2"])
def test_zero3_ranks_and_sequence_parallelism_match_one_rank(runs, layout):
    one, other = metrics(runs["one"]), metrics(runs[layout])
    assert len(one) == len(other) == 3
    # the step index comes from a draw every rank shares: the same k in every step on every layout
    assert [m["reward/step_fraction"] for m in other] == [m["reward/step_fraction"] for m in one]
    assert other[0]["loss/total"] == pytest.approx(one[0]["loss/total"], rel=1e-6)
    for key in ("loss/reward", "loss/sft", "loss/total"):
        assert [m[key] for m in other] == pytest.approx([m[key] for m in one], rel=1e-4), key


def test_the_export_is_the_trained_generator(runs):
    model = DiT.from_pretrained(runs["one"] / "checkpoints/step_000003/model")
    torch.manual_seed(0)
    initial = DiT(DiTConfig.preset("tiny"))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
