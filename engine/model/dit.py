"""The Wan2.1 video diffusion transformer (DiT), numerically Wan's own `WanModel`.

Parameter names are the original Wan2.1 names (`blocks.0.self_attn.q.weight`, ...), so original checkpoints,
checkpoints written by the reference PRFL code and our own exports are interchangeable. Loading and saving lives in
`engine/model/weights.py`; this file only defines the network.

Numerics follow Wan: the residual stream, modulation, norms, time embedding and output head run in fp32, the
linear layers of attention/FFN/text embedding in the parameters' dtype (bf16 when trained in bf16), rotary phases
are computed in float64. The model is single-device: ZeRO, Ulysses and activation offload are applied from outside
(`engine/distributed/parallel.py`, `engine/distributed/offload.py`); the seams they use are `DiT.embed`,
`DiT.run_block`, `DiT.unpatchify` and `Attention` (the parameter-free attention core of the self-attention).

Shapes: B batch, C channels, F/H/W latent frames/height/width, S = (F/pt)(H/ph)(W/pw) video tokens, D model dim,
L text tokens (padded to `text_len` = 512 like Wan), N heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens per conditioning image (Wan i2v)


@dataclass
class DiTConfig:
    """Architecture of a Wan2.1 DiT; field names are those of Wan's `config.json`."""

    model_type: Literal["t2v", "i2v"] = "t2v"  # i2v adds the CLIP image branch and condition channels
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) of one token
    text_len: int = 512  # text context length after padding (Wan pads umT5 output to 512)
    in_dim: int = 16  # input channels: 16 latent (+ 4 mask + 16 condition for i2v)
    dim: int = 1536  # model width D
    ffn_dim: int = 8960  # FFN hidden width
    freq_dim: int = 256  # sinusoidal time-embedding width
    text_dim: int = 4096  # text encoder width (umT5-XXL)
    out_dim: int = 16  # output channels (velocity)
    num_heads: int = 12  # attention heads N
    num_layers: int = 30  # transformer blocks
    qk_norm: bool = True  # RMSNorm over the full model dim on q and k
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention (norm3)
    eps: float = 1e-6  # epsilon of every norm
    clip_dim: int = 1280  # CLIP token width (i2v)
    attention_backend: Literal["sdpa", "flash"] = "sdpa"  # runtime choice, not saved with the weights
    # norms, modulation, rotary: the fused Triton kernels or plain PyTorch; auto decides per call, Triton for
    # tensors on a CUDA device (so a model on the CPU of a GPU machine still runs)
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"

    RUNTIME_FIELDS = ("attention_backend", "kernel_backend")

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"DiTConfig.model_type={self.model_type!r}: expected 't2v' or 'i2v'")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig: head dim {self.head_dim} (dim / num_heads) must be even for rotary")
        if self.attention_backend not in ("sdpa", "flash"):
            raise ValueError(f"DiTConfig.attention_backend={self.attention_backend!r}: expected 'sdpa' or 'flash'")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"DiTConfig.kernel_backend={self.kernel_backend!r}: expected 'auto', 'torch' or 'triton'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """A named architecture (`PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; available: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        """Architecture fields only, in Wan's `config.json` naming."""
        d = dataclasses.asdict(self)
        for name in self.RUNTIME_FIELDS:
            d.pop(name)
        d["patch_size"] = list(self.patch_size)
        return d


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-i2v-14b": DiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tests and the embedded default: a head dim of 20 splits unevenly into (8, 6, 6) rotary dims like Wan's 128.
    "tiny": DiTConfig(dim=40, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32),
    "tiny-i2v": DiTConfig(model_type="i2v", in_dim=36, dim=40, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32,
                          clip_dim=48),
}  # plugins add theirs (engine.synthetic: `synthetic`, `synthetic-i2v`)


# ---------------------------------------------------------------------------------------------------------------
# Elementwise pieces: plain PyTorch in fp32, or the fused Triton kernels of `kernels/`. `kernels` is the configured
# backend (DiTConfig.kernel_backend); `use_triton` resolves it for the tensor at hand.


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in Wan's fp32 compute precision (residual stream, norms, modulation), or kept in float64: a float64 model
    computes in float64 throughout (gradient checks against finite differences)."""
    return x if x.dtype == torch.float64 else x.float()


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernels run on x: always with 'triton', with 'auto' when x is on a CUDA device and not
    float64 (the kernels compute in fp32; a float64 model is for gradient checks)."""
    return kernels == "triton" or (kernels == "auto" and x.is_cuda and x.dtype != torch.float64)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "torch") -> torch.Tensor:
    """RMSNorm over the last dim; fp32 result with torch, x's dtype with triton."""
    if use_triton(kernels, x):
        from engine.kernels.rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    x = wide(x)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wide(weight)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         kernels: str = "torch") -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` (no affine) of the fp32 residual stream x [B, S, D]; shift/scale
    [B, 1, D]; fp32 result."""
    if use_triton(kernels, x):
        from engine.kernels.modulated_layer_norm import modulated_layer_norm as triton_modulated_layer_norm

        return triton_modulated_layer_norm(x.float(), shift, scale, eps)
    x = F.layer_norm(wide(x), x.shape[-1:], eps=eps)
    return x * (1 + scale) + shift


def residual_modulated_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float, kernels: str = "torch"
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update `x + gate * y` (gate None: plain add) and the modulated LayerNorm of its result, fused
    into one pass with triton; returns (new fp32 residual stream, normalised and modulated fp32 activations)."""
    if use_triton(kernels, x):
        from engine.kernels.modulated_layer_norm import residual_modulated_layer_norm as triton_residual

        return triton_residual(x.float(), y, gate, shift, scale, eps)
    x = x + (wide(y) if gate is None else wide(y) * gate)
    return x, modulated_layer_norm(x, shift, scale, eps)


class Rope(NamedTuple):
    """Rotary phases for each video token: cos and sin of shape [S, 1, Dh/2] (fp32)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def slice(self, start: int, end: int) -> "Rope":
        return Rope(self.cos[start:end], self.sin[start:end])


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dim across (frame, height, width): height = width = 2 * (Dh // 6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_for_grid(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0) -> Rope:
    """Phases of Wan's 3D rotary embedding for a (F, H, W) token grid, tokens in (f, h, w) row-major order.

    Each axis uses frequencies theta^(-2i/d_axis) over its own d_axis dims; pairs are adjacent (x[2i], x[2i+1]).
    """
    angles = []
    for size, dim, view in zip(grid, rope_axis_dims(head_dim), ((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        a = torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv_freq)
        angles.append(a.view(*view, dim // 2).expand(*grid, dim // 2))
    angles = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)
    return Rope(angles.cos().float(), angles.sin().float())


def apply_rope(x: torch.Tensor, rope: Rope, kernels: str = "torch") -> torch.Tensor:
    """Rotate adjacent pairs of x [B, S, N, Dh] by the phases; fp32 result with torch, x's dtype with triton."""
    if use_triton(kernels, x):
        from engine.kernels.rope import apply_rope as triton_rope

        return triton_rope(x, rope.cos, rope.sin)
    x = wide(x).unflatten(-1, (-1, 2))
    real, imag = x[..., 0], x[..., 1]
    return torch.stack((real * rope.cos - imag * rope.sin, real * rope.sin + imag * rope.cos), dim=-1).flatten(-2)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in fp32 whatever its parameters' dtype (Wan runs these under fp32 autocast); in
    float64 for a float64 layer."""
    dtype = wide(layer.weight).dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] (cos first, then sin), computed in float64 like Wan."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([args.cos(), args.sin()], dim=1).float()


# ---------------------------------------------------------------------------------------------------------------
# Attention


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ImportError("attention_backend='flash' needs flash-attn: pip install -e '.[gpu]'") from e
    half = torch.bfloat16 if q.dtype == torch.float32 else q.dtype
    return flash_attn_func(q.to(half), k.to(half), v.to(half)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Full (non-causal) attention; q [B, Sq, N, Dh], k/v [B, Sk, N, Dh] -> [B, Sq, N, Dh]."""
    if backend == "flash":
        return _flash_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Parameter-free attention core of the self-attention; `engine/distributed/parallel.py` wraps it for Ulysses."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str) -> None:
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernels)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim, self.num_heads = cfg.dim, cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps, cfg.kernel_backend) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps, cfg.kernel_backend) if cfg.qk_norm else nn.Identity()
        self.attn = Attention(cfg.attention_backend)
        self.kernels = cfg.kernel_backend

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, S, D] (fp32) -> [B, S, D] in the parameters' dtype."""
        x = x.to(self.q.weight.dtype)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)), rope, self.kernels)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), rope, self.kernels)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = self.attn(q.to(x.dtype), k.to(x.dtype), v)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention of video tokens to the text (and, for i2v, to the CLIP image tokens through k_img / v_img)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim, self.num_heads, self.backend = cfg.dim, cfg.num_heads, cfg.attention_backend
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps, cfg.kernel_backend) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps, cfg.kernel_backend) if cfg.qk_norm else nn.Identity()
        self.image = cfg.model_type == "i2v"
        if self.image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, cfg.eps, cfg.kernel_backend) if cfg.qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, S, D]; context [B, (257 +) L, D], CLIP tokens first for i2v."""
        dtype = self.q.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        q = self._heads(self.norm_q(self.q(x)), dtype)
        if self.image:
            context_img, context = context[:, :CLIP_TOKENS], context[:, CLIP_TOKENS:]
        out = attention(q, self._heads(self.norm_k(self.k(context)), dtype), self._heads(self.v(context), dtype),
                        self.backend)
        if self.image:
            k_img = self._heads(self.norm_k_img(self.k_img(context_img)), dtype)
            out = out + attention(q, k_img, self._heads(self.v_img(context_img), dtype), self.backend)
        return self.o(out.flatten(2))


class Block(nn.Module):
    """One Wan2.1 block: modulated self-attention, cross-attention, modulated GELU-tanh FFN, gated residuals."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps, self.kernels = cfg.eps, cfg.kernel_backend
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, S, D] fp32 residual stream; e [B, 6, D] fp32 time modulation; context [B, L', D]."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (wide(self.modulation) + e).chunk(6, dim=1)
        y = self.self_attn(modulated_layer_norm(x, shift_sa, scale_sa, self.eps, self.kernels), rope)
        x = x + wide(y) * gate_sa
        if isinstance(self.norm3, nn.LayerNorm):
            h = F.layer_norm(x, x.shape[-1:], wide(self.norm3.weight), wide(self.norm3.bias), self.eps)
        else:
            h = x
        x, h = residual_modulated_layer_norm(x, self.cross_attn(h, context), None, shift_ff, scale_ff, self.eps,
                                             self.kernels)
        return x + wide(self.ffn(h.to(self.ffn[0].weight.dtype))) * gate_ff


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps, self.kernels = cfg.eps, cfg.kernel_backend
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], e [B, D] -> [B, S, out_dim * prod(patch)] fp32."""
        shift, scale = (wide(self.modulation) + e.unsqueeze(1)).chunk(2, dim=1)
        return linear_fp32(self.head, modulated_layer_norm(x, shift, scale, self.eps, self.kernels))


class ImageEmbedding(nn.Module):
    """CLIP tokens -> model width: LayerNorm, Linear, GELU, Linear, LayerNorm (Wan's `MLPProj`)."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), nn.LayerNorm(dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        dtype = fc1.weight.dtype
        h = F.layer_norm(clip_fea.to(wide(norm_in.weight).dtype), norm_in.normalized_shape, wide(norm_in.weight),
                         wide(norm_in.bias), norm_in.eps)
        h = fc2(act(fc1(h.to(dtype))))
        return F.layer_norm(wide(h), norm_out.normalized_shape, wide(norm_out.weight), wide(norm_out.bias),
                            norm_out.eps)


class DiTInputs(NamedTuple):
    """One evaluation's inputs, as `DiT.forward` takes them: x [B, C, F, H, W], t [B], context [B, L, text_dim] and,
    for i2v, clip_fea [B, 257, clip_dim] and y [B, in_dim - C, F, H, W] (None for t2v)."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def __call__(self, model) -> torch.Tensor:
        """The model's output on these inputs (model: a DiT, or an engine wrapping one)."""
        return model(self.x, self.t, self.context, clip_fea=self.clip_fea, y=self.y)

    @staticmethod
    def cat(*parts: "DiTInputs") -> "DiTInputs":
        """The parts batched together (one evaluation); their i2v conditions must all be given or all absent."""
        fields = []
        for values in zip(*parts):
            if all(v is None for v in values):
                fields.append(None)
            elif any(v is None for v in values):
                raise ValueError("DiTInputs.cat: some parts carry an i2v condition (clip_fea, y) and others not")
            else:
                fields.append(torch.cat(values))
        return DiTInputs(*fields)


class Embedded(NamedTuple):
    """Everything the blocks need, produced by `DiT.embed`."""

    tokens: torch.Tensor  # [B, S, D] fp32 residual stream
    e: torch.Tensor  # [B, D] fp32 time embedding (for the head)
    e6: torch.Tensor  # [B, 6, D] fp32 block modulation
    context: torch.Tensor  # [B, (257 +) text_len, D]
    rope: Rope
    grid: tuple[int, int, int]  # token grid (F/pt, H/ph, W/pw)


class DiT(nn.Module):
    """Wan2.1 DiT. Build on the meta device (`with torch.device('meta'):`) to size a model without memory."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = ImageEmbedding(cfg.clip_dim, cfg.dim)
        self.gradient_checkpointing = False
        self.sequence_shards = None  # set by engine.distributed.parallel.apply_ulysses
        self._rope_cache: dict[tuple, Rope] = {}
        if self.patch_embedding.weight.device.type != "meta":
            self.init_weights()

    # -- construction -------------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """Wan's initialisation: Xavier linears, N(0, 0.02) embedding MLPs, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations."""
        self.gradient_checkpointing = enabled

    # -- forward ------------------------------------------------------------------------------------------------

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        key = (*grid, str(device))
        if key not in self._rope_cache:
            # Normal tensors even when first built inside inference mode (sampling before training): training
            # reuses the cache.
            with torch.inference_mode(False):
                self._rope_cache[key] = rope_for_grid(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def _check_inputs(self, x, t, context, clip_fea, y) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if channels != cfg.in_dim:
            got = f"x has {x.shape[1]} channels" + ("" if y is None else f" and y {y.shape[1]}")
            raise ValueError(f"{got}; the model expects {cfg.in_dim} input channels in total")
        if y is not None and y.shape[2:] != x.shape[2:]:
            raise ValueError(f"y spatial shape {tuple(y.shape[2:])} differs from x {tuple(x.shape[2:])}")
        for axis, size, p in zip("FHW", x.shape[2:], cfg.patch_size):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by the patch size {p}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B]=({x.shape[0]},), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={x.shape[0]}, L, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; at most text_len={cfg.text_len} are allowed")
        if cfg.model_type == "i2v":
            if clip_fea is None or y is None:
                raise ValueError("an i2v model needs clip_fea [B, 257, clip_dim] and y (mask + condition latents)")
            if clip_fea.shape[1:] != (CLIP_TOKENS, cfg.clip_dim):
                raise ValueError(f"clip_fea must be [B, {CLIP_TOKENS}, {cfg.clip_dim}], got {tuple(clip_fea.shape)}")
        elif clip_fea is not None:
            raise ValueError("clip_fea was given to a t2v model (model_type='t2v')")

    def embed(self, x, t, context, clip_fea=None, y=None) -> Embedded:
        """Patch, time, text (and image) embeddings; see `forward` for the arguments."""
        self._check_inputs(x, t, context, clip_fea, y)
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y], dim=1)
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(tokens.shape[2:])
        tokens = wide(tokens.flatten(2).transpose(1, 2))

        time_mlp_in, _, time_mlp_out = self.time_embedding
        e = linear_fp32(time_mlp_out, F.silu(linear_fp32(time_mlp_in, sinusoidal_embedding(t, cfg.freq_dim))))
        e6 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, cfg.dim))

        # Wan pads the text to text_len with zeros *before* the text MLP, so padding tokens are attended to.
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        if clip_fea is not None:
            context = torch.cat([self.img_emb(clip_fea).to(context.dtype), context], dim=1)
        return Embedded(tokens, e, e6, context, self.rope(grid, tokens.device), grid)

    def run_block(self, block: Block, tokens: torch.Tensor, emb: Embedded) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, emb.e6, emb.context, emb.rope, use_reentrant=False)
        return block(tokens, emb.e6, emb.context, emb.rope)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output [B, S, out_dim * prod(patch)] -> [B, out_dim, F, H, W]."""
        (f, h, w), (pf, ph, pw) = grid, self.config.patch_size
        out = out.view(out.shape[0], f, h, w, pf, ph, pw, self.config.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(out.shape[0], -1, f * pf, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
                y: torch.Tensor | None = None, return_features: list[int] | None = None):
        """Predict the flow velocity.

        Args:
            x: noisy latents [B, C, F, H, W].
            t: timesteps [B] in [0, 1000] (t = 1000 * sigma).
            context: text embeddings [B, L, text_dim], L <= text_len; zero-padded to text_len like Wan.
            clip_fea: i2v only, CLIP image tokens [B, 257, clip_dim].
            y: i2v only, mask + condition latents [B, in_dim - C, F, H, W], concatenated to x on channels.
            return_features: 1-based block indices; if given, return the token features [B, S, D] (fp32) after
                those blocks, in the order asked, and skip the blocks after the deepest one.
        Returns:
            velocity [B, out_dim, F, H, W] (fp32), or the list of features.
        """
        emb = self.embed(x, t, context, clip_fea, y)
        tokens = emb.tokens
        if return_features is not None:
            wanted = sorted(set(return_features))
            if not wanted or wanted[0] < 1 or wanted[-1] > len(self.blocks):
                raise ValueError(f"return_features={return_features}: block indices must be in 1..{len(self.blocks)}")
            features = {}
            for index, block in enumerate(self.blocks[: wanted[-1]], start=1):
                tokens = self.run_block(block, tokens, emb)
                if index in wanted:
                    features[index] = tokens
            return [features[i] for i in return_features]
        for block in self.blocks:
            tokens = self.run_block(block, tokens, emb)
        return self.unpatchify(self.head(tokens, emb.e), emb.grid)
