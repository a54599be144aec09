"""Our DiT against diffusers' WanTransformer3DModel fed the same original-format weights."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from conftest import dit_inputs, randomized_dit
from engine.model.dit import DiT


def diffusers_twin(model: DiT) -> WanTransformer3DModel:
    """diffusers' model holding our weights, converted with diffusers' own converter."""
    cfg = model.config
    image = cfg.model_type == "i2v"
    twin = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
        image_dim=cfg.clip_dim if image else None, added_kv_proj_dim=cfg.dim if image else None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin.load_state_dict(convert_wan_transformer_to_diffusers(state), strict=True)
    return twin.eval()


def diffusers_forward(twin, inputs):
    x = inputs["x"] if "y" not in inputs else torch.cat([inputs["x"], inputs["y"]], dim=1)
    return twin(x, inputs["t"], inputs["context"], encoder_hidden_states_image=inputs.get("clip_fea"),
                return_dict=False)[0]


@torch.no_grad()
def test_output_matches_diffusers(preset):
    model = randomized_dit(preset)
    inputs = dit_inputs(model.config)
    ours, theirs = model(**inputs), diffusers_forward(diffusers_twin(model), inputs)
    assert ours.shape == theirs.shape == (2, 16, 5, 6, 10)
    assert theirs.abs().max() > 0.5  # not a degenerate (zero-head) comparison
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def test_features_match_diffusers_block_outputs(preset):
    model = randomized_dit(preset, num_layers=3)
    twin = diffusers_twin(model)
    inputs = dit_inputs(model.config, batch=1)
    captured = {}
    for i, block in enumerate(twin.blocks, start=1):
        block.register_forward_hook(lambda _m, _a, out, i=i: captured.__setitem__(i, out))
    diffusers_forward(twin, inputs)
    features = model(**inputs, return_features=[2, 1])
    assert [f.shape for f in features] == [captured[2].shape, captured[1].shape] == [(1, 5 * 3 * 5, 40)] * 2
    for ours, k in zip(features, [2, 1]):
        assert (ours - captured[k]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_return_features_skips_later_blocks():
    model = randomized_dit("tiny", num_layers=4)
    calls = []
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    model(**dit_inputs(model.config, batch=1), return_features=[2])
    assert calls == [1, 2]
    with pytest.raises(ValueError, match="1..4"):
        model(**dit_inputs(model.config, batch=1), return_features=[5])


def test_short_text_is_zero_padded_like_wan():
    model = randomized_dit("tiny")
    inputs = dit_inputs(model.config, batch=1, text_tokens=7)
    padded = dict(inputs, context=torch.nn.functional.pad(inputs["context"], (0, 0, 0, 512 - 7)))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model(**padded), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomized_dit("tiny-i2v").train()
    inputs = dit_inputs(model.config, batch=1)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(enabled)
        model(**inputs).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["blocks.0.self_attn.q.weight"].abs().sum() > 0


def test_bf16_parameters_keep_an_fp32_residual_stream():
    model = randomized_dit("tiny")
    inputs = dit_inputs(model.config, batch=1)
    with torch.no_grad():
        reference = model(**inputs)
        low = model.to(torch.bfloat16)(**inputs)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(1, 15, 5, 6, 10)), "15 channels"),
    (dict(x=torch.randn(1, 16, 5, 7, 10)), "H=7 is not divisible"),
    (dict(context=torch.randn(1, 513, 32)), "at most text_len=512"),
    (dict(t=torch.tensor([1.0, 2.0])), r"t must have shape \[B\]"),
])
def test_bad_inputs_are_named(bad, message):
    model = randomized_dit("tiny")
    inputs = dict(dit_inputs(model.config, batch=1), **bad)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_i2v_requires_its_conditions():
    model = randomized_dit("tiny-i2v")
    inputs = dit_inputs(model.config, batch=1)
    inputs.pop("clip_fea")
    with pytest.raises(ValueError, match="i2v model needs clip_fea"):
        model(**inputs)
