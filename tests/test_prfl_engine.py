"""PRFL training through DeepSpeed's launcher on CPU ranks: ZeRO-3 and sequence parallelism against one rank,
the same step index on every rank, and a reward model that is only read."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch
from engine.model.dit import DiT, DiTConfig
from engine.model.reward import RewardModel, RewardModelConfig
from engine.model.weights import load_dit
from engine.steps.feedback import stage_of

PRFL = "runners/prfl.py"
COMMON = ["--config", "configs/tiny.yaml", "--ds_config", "ds_configs/z3_offload.json", "train.steps=3",
          "train.lr=1e-3", "train.log_every=1", "sampling.steps=4", "prfl.sft_weight=0.5"]


def metrics(run: Path, evaluations: bool = False) -> list[dict]:
    """The logged training steps (or, with `evaluations`, the records holding an evaluation)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if ("val/reward_mean" in r) == evaluations or (not evaluations and r["step"] > 0)]


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
    launch(1, PRFL, *args, f"output_dir={base / 'one'}", "train.micro_batch_size=2", "train.eval_every=2",
           "eval.samples=3", "eval.batch_size=2")
    # sampling before training must leave ZeRO-3's gathered parameters usable for training
    launch(2, PRFL, *args, f"output_dir={base / 'two'}", "train.micro_batch_size=1", "train.eval_every=3",
           "eval.samples=2")
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
    model = load_dit(runs["one"] / "checkpoints/step_000003/model")
    torch.manual_seed(0)
    initial = DiT(DiTConfig.preset("tiny"))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))


def test_fixed_prompts_are_sampled_and_scored_before_training_and_every_eval_every_steps(runs):
    evaluations = metrics(runs["one"], evaluations=True)
    assert [r["step"] for r in evaluations] == [0, 2, 3]  # before training, every 2 steps, and at the end
    for record in evaluations:
        index = [json.loads(line) for line in
                 (runs["one"] / f"samples/step_{record['step']:06d}/index.jsonl").read_text().splitlines()]
        assert [r["seed"] for r in index] == [10_000, 10_001, 10_002]
        logits = torch.tensor([r["reward_logit"] for r in index])
        assert record["val/reward_mean"] == pytest.approx(logits.mean().item(), rel=1e-5)
        assert record["val/reward_std"] == pytest.approx(logits.std().item(), rel=1e-4)
    first, last = (runs["one"] / f"samples/step_{s:06d}/00000.safetensors" for s in (0, 3))
    assert not torch.equal(load_file(first)["latents"], load_file(last)["latents"])  # the generator trained


def test_the_reward_is_logged_for_the_stage_of_the_chain_its_step_falls_in(runs):
    for record in metrics(runs["one"]):
        k = round(record["reward/step_fraction"] * 4)
        assert record[f"reward/logit_{stage_of(k, 4)}"] == pytest.approx(record["reward/logit_mean"])
        assert {"memory/peak_host_rss_gb", "step_time_s", "grad_norm", "lr", "loss/sft"} <= record.keys()
