"""Checkpoint interop: original Wan2.1 format round trip, diffusers folders, single files, strict errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dit_parity import diffusers_twin

from conftest import dit_inputs, randomized_dit
from engine.errors import CheckpointError
from engine.model.weights import load_dit, save_dit


@torch.no_grad()
def test_save_load_round_trip_is_bit_identical(preset, tmp_path):
    model = randomized_dit(preset)
    save_dit(model, tmp_path / "ckpt", max_shard_size="200KB")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3  # sharded + index
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["_class_name"] == "WanModel" and config["model_type"] == model.config.model_type
    assert "attention_backend" not in config
    loaded = load_dit(tmp_path / "ckpt")
    assert loaded.config == model.config
    inputs = dit_inputs(model.config)
    torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


@torch.no_grad()
def test_diffusers_folder_loads_and_matches(preset, tmp_path):
    model = randomized_dit(preset)
    diffusers_twin(model).save_pretrained(tmp_path / "diffusers")
    loaded = load_dit(tmp_path / "diffusers")
    assert loaded.config == model.config
    inputs = dit_inputs(model.config)
    torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


@torch.no_grad()
def test_single_file_with_comfy_prefix_and_inferred_config(tmp_path):
    # dim 1536 is a released width, so the head count can be inferred without a config.json.
    model = randomized_dit("tiny", dim=1536, num_heads=12, ffn_dim=64, num_layers=1)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "wan.safetensors")
    loaded = load_dit(tmp_path / "wan.safetensors")
    assert loaded.config == model.config
    inputs = dit_inputs(model.config, batch=1)
    torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


@torch.no_grad()
def test_truncated_load_keeps_only_the_first_blocks(tmp_path):
    model = randomized_dit("tiny", num_layers=4)
    save_dit(model, tmp_path / "ckpt")
    trunk = load_dit(tmp_path / "ckpt", num_layers=2, dtype=torch.bfloat16)
    assert len(trunk.blocks) == 2 and trunk.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    inputs = dit_inputs(model.config, batch=1)
    expected = model.to(torch.bfloat16)(**inputs, return_features=[2])[0]
    torch.testing.assert_close(trunk(**inputs, return_features=[2])[0], expected, rtol=0, atol=0)


def _edit_checkpoint(tmp_path, edit):
    save_dit(randomized_dit("tiny"), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)
    return tmp_path / "ckpt"


def test_missing_key_is_named(tmp_path):
    path = _edit_checkpoint(tmp_path, lambda s: s.pop("blocks.1.cross_attn.k.bias"))
    with pytest.raises(CheckpointError, match=r"missing key blocks\.1\.cross_attn\.k\.bias \(expected shape \(40,\)\)"):
        load_dit(path)


def test_extra_key_is_named(tmp_path):
    path = _edit_checkpoint(tmp_path, lambda s: s.update({"blocks.0.lora_A.weight": torch.zeros(4, 40)}))
    with pytest.raises(CheckpointError, match=r"unexpected key blocks\.0\.lora_A\.weight \(shape \(4, 40\)\)"):
        load_dit(path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    path = _edit_checkpoint(tmp_path, lambda s: s.update({"head.head.weight": torch.zeros(32, 40)}))
    with pytest.raises(CheckpointError, match=r"head\.head\.weight has shape \(32, 40\) in the checkpoint but "
                                              r"\(64, 40\) in the model"):
        load_dit(path)


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dit(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'} holds no"):
        load_dit(tmp_path / "empty")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = randomized_dit("tiny", seed=1)
    save_dit(first, tmp_path / "ckpt")
    import engine.model.weights

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(engine.model.weights, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_dit(randomized_dit("tiny", seed=2), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = load_dit(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.state_dict(), first.state_dict(), rtol=0, atol=0)
