"""Released Wan2.1 architectures, sized on the meta device (no memory is allocated)."""

import pytest
import torch

from engine.model.dit import DiT, DiTConfig, rope_axis_dims

# Parameter counts of the released checkpoints (Wan2.1 T2V-1.3B, T2V-14B, I2V-14B).
RELEASED = {"wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584, "wan2.1-i2v-14b": 16_394_878_784}


@pytest.mark.parametrize("name", RELEASED)
def test_preset_parameter_count_on_meta(name):
    with torch.device("meta"):
        model = DiT(DiTConfig.preset(name))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]


def test_14b_preset_shape():
    cfg = DiTConfig.preset("wan2.1-t2v-14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.head_dim) == (5120, 13824, 40, 40, 128)
    assert rope_axis_dims(cfg.head_dim) == (44, 42, 42)  # Wan's frame/height/width split of 128


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="wan2.1-t2v-14b"):
        DiTConfig.preset("wan2.2-t2v-14b")
