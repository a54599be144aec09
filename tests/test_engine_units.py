"""Engine pieces that need no second process: activation offload, DeepSpeed config resolution, data order."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import dit_inputs, randomized_dit
from engine.config_io import load_config
from engine.data.datasets import RandomLatents
from engine.data.order import GlobalOrder
from engine.distributed.offload import apply_activation_checkpointing
from engine.distributed.process import Layout
from engine.errors import ConfigError
from engine.model.dit import DiTConfig
from engine.model.weights import save_dit
from engine.train.ds_config import lr_lambda, resolve_ds_config
from engine.train.estimate import dry_run
from engine.train.randomness import SampleRandomness

ROOT = Path(__file__).resolve().parents[1]
Z3 = json.loads((ROOT / "ds_configs/z3_offload.json").read_text())


def loss_and_grads(model, inputs):
    loss = model(**inputs).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointing_and_offload_keep_loss_and_gradients(preset):
    base = randomized_dit(preset).train()
    inputs = dit_inputs(base.config, batch=1)
    plain_loss, plain = loss_and_grads(copy.deepcopy(base), inputs)
    results = {}
    for offload in (False, True):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, offload=offload)
        results[offload] = loss_and_grads(model, inputs)
    # Checkpointing with and without offload run the same arithmetic: bit-identical.
    assert results[False][0] == results[True][0]
    for name in plain:
        torch.testing.assert_close(results[True][1][name], results[False][1][name], rtol=0, atol=0)
        # Against no checkpointing only the order of gradient accumulation differs.
        torch.testing.assert_close(results[True][1][name], plain[name], rtol=1e-5, atol=1e-7)
    assert results[True][0] == plain_loss


def test_checkpointing_is_skipped_without_grad():
    model = randomized_dit("tiny")
    apply_activation_checkpointing(model, offload=True)
    with torch.no_grad():
        out = model(**dit_inputs(model.config, batch=1))
    assert not out.requires_grad


def test_ds_config_autos_are_filled_from_the_run_config():
    config = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=3", "train.grad_clip=0.5",
                                "train.lr=2e-5"])
    ds = resolve_ds_config(Z3, config, Layout(0, 8, sp_size=2))
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4  # data-parallel groups, not ranks
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["bf16"]["enabled"] is torch.cuda.is_available()
    assert ds["zero_optimization"]["reduce_scatter"] is False  # see resolve_ds_config: DeepSpeed's SP scaling
    assert Z3["train_batch_size" if "train_batch_size" in Z3 else "gradient_clipping"] == "auto"  # not mutated


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["zero_optimization"].update(stage=1), r"zero_optimization\.stage=1: expected 2 or 3"),
    (lambda d: d.update(train_micro_batch_size_per_gpu=4), r"train_micro_batch_size_per_gpu=4 disagrees"),
    (lambda d: d.update(train_batch_size=7), r"train_batch_size=7, but micro batch 1 x accumulation 1"),
    (lambda d: d.update(optimizer={"type": "Lamb"}), r"optimizer\.type='Lamb': expected AdamW"),
    (lambda d: d.update(scheduler={"type": "WarmupLR"}), r"scheduler: the LR schedule comes from the run config"),
    (lambda d: d["zero_optimization"].update(reduce_scatter=True), r"reduce_scatter=true scales ZeRO-3 gradients"),
])
def test_bad_ds_config_fields_are_named(edit, message):
    ds = copy.deepcopy(Z3)
    edit(ds)
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(ds, load_config(None), Layout(0, 2, sp_size=2), source="my.json")


def test_malformed_ds_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    done = subprocess.run([sys.executable, "runners/sft.py", "--ds_config", str(bad), f"output_dir={tmp_path / 'r'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"DeepSpeed config {bad} is not valid JSON" in done.stderr
    assert not (tmp_path / "r").exists()


def test_sp_size_must_divide_world_and_heads(monkeypatch):
    with pytest.raises(ConfigError, match="parallel.sp_size=3 must divide the world size 4"):
        Layout(0, 4, sp_size=3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="must divide the model's 2 heads"):
        dry_run(load_config(None, ["parallel.sp_size=4"]), Z3)


def test_dry_run_reports_model_data_and_memory(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    report = dry_run(load_config(ROOT / "configs/tiny.yaml"), Z3)
    assert report["parameters"] == sum(p.numel() for p in randomized_dit("tiny").parameters())
    assert report["tokens"] == 5 * 3 * 5  # latent (5, 6, 10) with patch (1, 2, 2)
    assert report["block_checkpoints_gb"] == pytest.approx(4 * 75 * 40 * 2 / 2**30)
    i2v = load_config(ROOT / "configs/tiny.yaml", ["model.preset=tiny-i2v"])
    with pytest.raises(ConfigError, match="data sample 0 does not fit the model: x has 16 channels; the model "
                                          "expects 36"):  # t2v data for an i2v model
        dry_run(i2v, Z3, dataset=RandomLatents(DiTConfig.preset("tiny"), 2, (5, 6, 10), 4))


def test_lr_schedule_warms_up_then_decays():
    config = load_config(None, ["train.steps=10", "train.warmup_steps=2", "train.schedule=cosine"])
    factor = lr_lambda(config)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.0) and 0 < factor(6) < 1


def test_global_order_visits_every_sample_once_per_epoch():
    order = GlobalOrder(7, seed=3)
    first, second = [order.index(n) for n in range(7)], [order.index(n) for n in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [GlobalOrder(7, seed=3).index(n) for n in range(14)] == first + second


def test_sample_randomness_depends_only_on_the_sample_number():
    together = SampleRandomness(5, [10, 11]).randn(3)
    apart = torch.cat([SampleRandomness(5, [10]).randn(3), SampleRandomness(5, [11]).randn(3)])
    torch.testing.assert_close(together, apart, rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])


def test_dry_run_reads_a_checkpoint_config_without_loading_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    save_dit(randomized_dit("tiny", num_layers=3), tmp_path / "ckpt")
    report = dry_run(load_config(ROOT / "configs/tiny.yaml", [f"model.path={tmp_path / 'ckpt'}"]), Z3)
    assert report["parameters"] == sum(p.numel() for p in randomized_dit("tiny", num_layers=3).parameters())
