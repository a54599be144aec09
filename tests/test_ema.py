"""EMA of the trained weights (engine/train/ema.py): the update rule, its sharded save / load / consolidation, and runs
through DeepSpeed's launcher on CPU ranks.

End to end, one ZeRO-2 rank trains 3 steps with a global batch of 2 and two ZeRO-3 ranks train the same steps, killed
after step 2 and resumed from the step-1 checkpoint. Each run's EMA export must equal the EMA computed by hand from
its own raw exports of every step (fp32: to 1e-6), which holds across the resume only if the EMA was restored exactly.
Between the runs the raw weights differ by summation order (a few 1e-6 at this learning rate); their EMAs, convex
combinations of those weights, may differ by no more.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import max_diff

from conftest import launch
from engine.config_io import load_config
from engine.errors import ConfigError
from engine.model.dit import DiT, DiTConfig
from engine.model.weights import load_dit
from engine.train.ema import ShardedEMA, consolidate, model_ema

DECAY = 0.9
RUN = ["train.steps=3", "train.save_every=1", "train.keep_last=3", "train.lr=1e-2", f"train.ema_decay={DECAY}"]


def toy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))


def flat_range_reader(model: torch.nn.Module, lo: int, hi: int):
    """Like a ZeRO-2 rank: the parts of the parameters that fall in [lo, hi) of their flat concatenation."""
    def read():
        shards, first = {}, 0
        for name, p in model.named_parameters():
            start, end = max(lo, first), min(hi, first + p.numel())
            if start < end:
                shards[name] = (start - first, p.detach().view(-1)[start - first:end - first])
            first += p.numel()
        return shards
    return read


def ranks(model: torch.nn.Module, bounds: list[int], start: int = 0) -> list[ShardedEMA]:
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return [ShardedEMA(flat_range_reader(model, lo, hi), shapes, DECAY, start, torch.device("cpu"))
            for lo, hi in zip(bounds, bounds[1:])]


def train(model: torch.nn.Module, emas: list[ShardedEMA], steps: int) -> list[dict[str, torch.Tensor]]:
    """Random "optimizer steps"; returns the weights w_0 .. w_steps."""
    weights = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in emas:
            ema.update(step)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    return weights


def closed_form(weights: list[dict], start: int = 0) -> dict[str, torch.Tensor]:
    """decay^(n - s) w_s + (1 - decay) sum_{k = s + 1..n} decay^(n - k) w_k, with s = start (w_0: the start)."""
    n = len(weights) - 1
    return {name: DECAY ** (n - start) * weights[start][name]
            + sum((1 - DECAY) * DECAY ** (n - k) * weights[k][name] for k in range(start + 1, n + 1))
            for name in weights[0]}


def save_all(emas: list[ShardedEMA], folder: Path) -> Path:
    for rank, ema in enumerate(emas):
        ema.save(folder, rank)
    return folder


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("start", [0, 2])
def test_update_is_the_closed_form_on_shards(tmp_path, start):
    model = toy()  # 26 parameters; two ranks split the first weight between them
    emas = ranks(model, [0, 11, 26], start)
    weights = train(model, emas, steps=5)
    assert_states_close(consolidate(save_all(emas, tmp_path)), closed_form(weights, start), atol=1e-6)


def test_load_restores_on_the_same_or_another_partitioning(tmp_path):
    model = toy()
    saved = ranks(model, [0, 11, 26])
    train(model, saved, steps=3)
    folder = save_all(saved, tmp_path / "ema")
    expected = consolidate(folder)
    for bounds in ([0, 11, 26], [0, 4, 17, 26], [0, 26]):  # same ranks (own file), more ranks, one rank
        restored = ranks(model, bounds)
        assert all(ema.load(folder, rank) for rank, ema in enumerate(restored))
        assert_states_close(consolidate(save_all(restored, tmp_path / f"again{len(bounds)}")), expected, atol=0)

    (folder / "rank_00001.pt").unlink()
    with pytest.raises(ValueError, match=r"cover 0 of this rank's 4 elements of 0\.weight"):
        ranks(model, [0, 11, 26])[1].load(folder, 1)
    with pytest.raises(ValueError, match="is a rank file missing"):
        consolidate(folder)
    fresh = ranks(model, [0, 26])[0]
    assert not fresh.load(tmp_path / "no_ema", 0)  # a checkpoint without EMA: start from the current weights
    assert_states_close(consolidate(save_all([fresh], tmp_path / "fresh")), model.state_dict(), atol=0)


def test_decay_zero_is_off_and_bad_values_name_the_field():
    assert model_ema(toy(), decay=0.0, start=0, device=torch.device("cpu")) is None
    assert load_config(None, []).train.ema_decay == 0.0
    for override, field in (("train.ema_decay=1.0", "train.ema_decay=1.0"), ("train.ema_decay=-0.1", "train.ema_decay"),
                            ("train.ema_start=-1", "train.ema_start=-1")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, [override])


# ---------------------------------------------------------------------------------------------------------------
# End to end


def export(run: Path, step: int, folder: str) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step_{step:06d}/{folder}/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ema_runs")
    one, two = base / "one", base / "two"
    launch(1, "runners/sft.py", "--ds_config", "ds_configs/z2.json", *RUN, f"output_dir={one}",
           "train.micro_batch_size=2")
    args = ["--ds_config", "ds_configs/z3_offload.json", *RUN, f"output_dir={two}", "train.micro_batch_size=1"]
    killed = launch(2, "tests.distributed.sft_with_fault", "--kill-after-step", "2", *args, check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (two / "checkpoints").glob("step_*")) == ["step_000001"]
    resumed = launch(2, "runners/sft.py", *args, "--resume", "auto")
    assert "step_000001 at step 1" in resumed.stdout and "has no EMA" not in resumed.stdout
    return {"one": one, "two": two}


@pytest.mark.parametrize("run", ["one", "two"])
def test_ema_export_is_the_average_of_the_raw_exports(runs, run):
    torch.manual_seed(0)  # the trainer's initial weights (run seed 0)
    weights = [DiT(DiTConfig.preset("tiny")).state_dict()]
    for step in (1, 2, 3):
        weights.append(export(runs[run], step, "model"))
        ema = export(runs[run], step, "model_ema")
        assert_states_close(ema, closed_form(weights), atol=1e-6)
    assert max_diff(ema, weights[-1]) > 1e-3  # the average lags the weights visibly
    assert (runs[run] / "checkpoints/step_000003/ema/rank_00001.pt").exists() == (run == "two")
    load_dit(runs[run] / "checkpoints/step_000003/model_ema")  # a loadable model folder


def test_two_zero3_ranks_resumed_match_one_rank(runs):
    for step in (1, 2, 3):
        weights = max_diff(export(runs["two"], step, "model"), export(runs["one"], step, "model"))
        emas = max_diff(export(runs["two"], step, "model_ema"), export(runs["one"], step, "model_ema"))
        assert weights <= 1e-5 and emas <= weights + 1e-7, (step, weights, emas)
