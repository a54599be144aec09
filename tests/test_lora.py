"""LoRA: peft adapters on the DiT, the merged export, and LoRA files that diffusers loads key for key.

diffusers is the reference reader: its `WanLoraLoaderMixin` (what `WanPipeline.load_lora_weights` runs) takes our
diffusers-layout file as it is and our original Wan / ComfyUI-layout file through its converter for non-diffusers
Wan LoRAs. Every key must be consumed and the adapted diffusers model must match our merged model (fp32; the two
models differ by ~1e-5 without LoRA, see test_dit_parity.py).
"""

import copy
import json
import logging

import pytest
import torch
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import logging as diffusers_logging
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from test_dit_parity import diffusers_forward, diffusers_twin

from conftest import dit_inputs, launch, randomized_dit
from engine.config_io import load_config
from engine.distributed.offload import apply_activation_checkpointing
from engine.errors import ConfigError
from engine.model.dit import DiT
from engine.model.lora import DIFFUSERS_FILE, LORA_TARGETS, ORIGINAL_FILE, LoRAConfig, add_lora, save_lora_export
from engine.model.weights import load_dit, save_dit

TOLERANCE = 1e-4  # our DiT vs diffusers' in fp32


def adapted(base: DiT, config: LoRAConfig, seed: int = 3) -> DiT:
    """A copy of `base` with adapters whose A and B are random (B is zero after injection)."""
    model = add_lora(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def diffusers_with_lora(base: DiT, lora_dir, weight_name: str, caplog):
    """diffusers' Wan model with our base weights and a LoRA file loaded the way WanPipeline.load_lora_weights does;
    asserts that the loaded adapters hold exactly the file's (converted) tensors and that diffusers warned nothing."""
    twin = diffusers_twin(base)
    state = WanLoraLoaderMixin.lora_state_dict(str(lora_dir), weight_name=weight_name, local_files_only=True)
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            WanLoraLoaderMixin.load_lora_into_transformer(copy.copy(state), transformer=twin, adapter_name="ours")
    finally:
        diffusers_logging.disable_propagation()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    loaded = get_peft_model_state_dict(twin, adapter_name="ours")
    expected = {k.removeprefix("transformer."): v for k, v in state.items()}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    return twin, state


# ---------------------------------------------------------------------------------------------------------------
# Adapters and merging


@torch.no_grad()
def test_adapters_start_as_no_op_and_the_merged_model_reproduces_them(tmp_path):
    base = randomized_dit("tiny")
    config = LoRAConfig(rank=4, alpha=6.0)
    inputs = dit_inputs(base.config)
    fresh = add_lora(copy.deepcopy(base), config)
    torch.testing.assert_close(fresh(**inputs), base(**inputs), rtol=0, atol=0)  # B = 0 at the start

    model = adapted(base, config)
    out = model(**inputs)
    assert (out - base(**inputs)).abs().max() > 0.1
    save_lora_export(model.state_dict(), base.config, config, tmp_path / "model", tmp_path / "lora")
    merged = load_dit(tmp_path / "model")
    assert (merged(**inputs) - out).abs().max().item() <= 1e-5

    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {f"blocks.{i}.{t}.weight" for i in range(2) for t in LORA_TARGETS[:8]}
    record = json.loads((tmp_path / "lora/lora_config.json").read_text())
    assert (record["rank"], record["alpha"], record["targets"]) == (4, 6.0, list(LORA_TARGETS[:8]))


def test_only_adapter_parameters_train_and_get_gradients_under_block_checkpointing():
    model = add_lora(randomized_dit("tiny").train(), LoRAConfig(rank=4, targets=["self_attn.q", "ffn.2"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{ab}.default.weight" for i in range(2)
                         for t in ("self_attn.q", "ffn.2") for ab in "AB"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    reference = copy.deepcopy(model)
    # Frozen embeddings mean no input of a checkpointed block requires grad: the engine's checkpointing must still
    # back-propagate into the adapters, exactly as a plain forward does.
    apply_activation_checkpointing(model)
    inputs = dit_inputs(model.config, batch=1)
    model(**inputs).square().mean().backward()
    reference(**inputs).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert q.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=4", "lora.targets=[self_attn.qkv]"], r"lora\.targets: unknown layer 'self_attn\.qkv'"),
    (["lora.rank=4", "lora.targets=[cross_attn.k_img]"], r"lora\.targets=.*k_img and cross_attn\.v_img go together"),
    (["lora.rank=4", "lora.targets=[]"], r"lora\.targets=\[\]: expected a non-empty list"),
    (["lora.rank=-1"], r"lora\.rank=-1: expected 0 \(off\) or a positive rank"),
    (["lora.rank=4", "lora.alpha=0"], r"lora\.alpha=0\.0: expected a positive number"),
    (["lora.rank=4", "lora.dropout=0.1"], r"lora\.dropout=0\.1 needs memory\.checkpointing=false"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_image_targets_on_a_t2v_model_are_named():
    with pytest.raises(ConfigError, match=r"lora\.targets: cross_attn\.k_img is not a linear layer of this t2v model"):
        add_lora(randomized_dit("tiny"), LoRAConfig(rank=4, targets=["cross_attn.k_img", "cross_attn.v_img"]))


# ---------------------------------------------------------------------------------------------------------------
# diffusers reads both files


@pytest.mark.parametrize("preset, targets", [("tiny", None), ("tiny-i2v", list(LORA_TARGETS))],
                         ids=["t2v-attention", "i2v-every-target"])
@torch.no_grad()
def test_diffusers_loads_both_lora_files_and_matches_the_merged_model(preset, targets, tmp_path, caplog):
    base = randomized_dit(preset)
    config = LoRAConfig(rank=4, alpha=2.0, **({"targets": targets} if targets else {}))
    save_lora_export(adapted(base, config).state_dict(), base.config, config, tmp_path / "model", tmp_path / "lora")
    inputs = dit_inputs(base.config)
    merged_out = load_dit(tmp_path / "model")(**inputs)
    assert (merged_out - base(**inputs)).abs().max() > 100 * TOLERANCE  # the adapters matter

    original = load_file(tmp_path / "lora" / ORIGINAL_FILE)
    layers = len(base.blocks) * len(config.targets)
    assert len(original) == 3 * layers and all(original[k].item() == 2.0 for k in original if k.endswith(".alpha"))
    states = {}
    for weight_name in (DIFFUSERS_FILE, ORIGINAL_FILE):
        caplog.clear()
        twin, states[weight_name] = diffusers_with_lora(base, tmp_path / "lora", weight_name, caplog)
        assert len(states[weight_name]) == 2 * layers
        assert (diffusers_forward(twin, inputs) - merged_out).abs().max().item() <= TOLERANCE
    # The converter consumed every key of the original layout (it raises on leftovers) and mapped the same layers.
    assert states[DIFFUSERS_FILE].keys() == states[ORIGINAL_FILE].keys()


# ---------------------------------------------------------------------------------------------------------------
# End to end: DeepSpeed ZeRO-3 (CPU offload) on one CPU rank, from a base checkpoint on disk


@torch.no_grad()
def test_lora_run_exports_merged_model_and_loadable_lora_files(tmp_path, caplog):
    base = randomized_dit("tiny", seed=5)
    save_dit(base, tmp_path / "base")
    launch(1, "runners/sft.py", "--ds_config", "ds_configs/z3_offload.json", f"model.path={tmp_path / 'base'}",
           "lora.rank=4", "lora.alpha=8", "train.steps=2", "train.lr=1e-2", "train.micro_batch_size=2",
           f"output_dir={tmp_path / 'run'}")
    step = tmp_path / "run/checkpoints/step_000002"
    merged = load_dit(step / "model")
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {f"blocks.{i}.{t}.weight" for i in range(2) for t in LORA_TARGETS[:8]}
    assert json.loads((step / "lora/lora_config.json").read_text())["alpha"] == 8.0

    inputs = dit_inputs(base.config)
    merged_out = merged(**inputs)
    assert (merged_out - base(**inputs)).abs().max() > 10 * TOLERANCE  # two steps moved the model
    for weight_name in (DIFFUSERS_FILE, ORIGINAL_FILE):
        caplog.clear()
        twin, _ = diffusers_with_lora(base, step / "lora", weight_name, caplog)
        assert (diffusers_forward(twin, inputs) - merged_out).abs().max().item() <= TOLERANCE
