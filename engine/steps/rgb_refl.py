"""The RGB ReFL baseline step: the pixel-space reward feedback learning that PRFL is measured against.

    step = build_rgb_refl_step(run_config, rgb_config, device, dtype)       # rgb_config: engine.config.RGBReFLConfig
    loss, metrics = step(generator, batch, rng)                             # a FeedbackStep, as PRFL's

Per micro-batch: the generator's chain is rolled out to a step k drawn from `prfl.stage` without gradients (the
shared reward-feedback step, steps/feedback.py), step k runs with gradients, its velocity gives the one-step prediction
x0 = x_k - sigma_k * v, the frozen Wan2.1 VAE decodes x0 to pixels and a frozen pixel reward model scores them;
the gradient flows back through the reward model and the decoder into step k. Two forms, as the paper compares:

- `frames: first` (ContentV-style, the paper's Table 4 baseline): decode latent frame 0 only (one RGB frame) and
  score it with a PickScore-class image model, CLIP ViT-H/14.
- `frames: all`: decode all frames (81 for 21 latent frames) and score them with a VideoAlign-class video model,
  Qwen2-VL-2B, reading frames sampled at 2 fps and resized to its pixel budget as VideoAlign's processor does.

Neither reward model reads the prompt. PickScore scores an image against the CLIP-tokenised prompt and VideoAlign
puts the prompt in its chat template, but our latent datasets carry umT5 embeddings, not prompt text, so both heads
read the pixels only: CLIP's projected image embedding -> linear -> score (an aesthetic-predictor-style head), and
Qwen2-VL's last hidden state after the video tokens -> linear -> score (VideoAlign reads a reward token after the
prompt). For cost this drops PickScore's 354M-parameter text tower (0.7 GB of bf16 weights, no activations on the
gradient path) and VideoAlign's few dozen prompt tokens next to about 1,260 video tokens.

Both frozen models get their best memory settings: the decoder runs frame by frame with each frame's pass
recomputed in backward (`vae_checkpointing`; diffusers' AutoencoderKLWan has no gradient checkpointing of its own),
and the reward models use transformers' per-layer activation checkpointing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Qwen2VLConfig, Qwen2VLModel

from engine.config import PRFLConfig, RGBReFLConfig, RunConfig, SamplingConfig
from engine.errors import ConfigError
from engine.model.encoders import VAE, _check_loaded
from engine.model.flow import predict_x0
from engine.steps.feedback import FeedbackStep, Rollout, check_frozen

HEAD_FILE = "head.safetensors"

# CLIP ViT-H/14 as PickScore (laion CLIP-ViT-H-14) has it: vision tower and its 1024-d projection.
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
# Qwen2-VL-2B (VideoAlign's base model); the LM head is not used.
QWEN2_VL_2B = dict(
    text_config=dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
)

# Tests and smoke runs: tiny stand-ins of the three frozen models (as the `tiny` DiT preset is of Wan2.1). The
# video model's pixel budget goes with it: RGBReFLConfig(min_pixels=TINY_PIXELS[0], max_pixels=TINY_PIXELS[1]).
TINY_VAE = dict(base_dim=8, num_res_blocks=1)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 projection_dim=16)
TINY_QWEN2_VL = dict(
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
    image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
TINY_PIXELS = (28 * 28, 56 * 56)


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] pixels [..., 3, H, W] -> the model's normalised input: rescaled to [0, 1], minus mean, over std."""
    shape = (3, 1, 1)
    mean, std = pixels.new_tensor(mean).view(shape), pixels.new_tensor(std).view(shape)
    return ((pixels + 1) / 2 - mean) / std


class _FrozenScorer(nn.Module):
    """A transformers backbone + linear head -> one score per sample; saved as the backbone's own folder plus
    head.safetensors, loaded strictly (a missing or mis-shaped weight is an error)."""

    backbone_class: type
    config_class: type
    default_config: dict

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    @classmethod
    def random(cls, overrides: dict | None = None, **options):
        """Random weights at the default size (the real model's architecture), fields overridden (tests: tiny)."""
        backbone = cls.backbone_class(cls.config_class(**_merged(cls.default_config, overrides or {})))
        return cls(backbone, nn.Linear(cls.head_width(backbone.config), 1), **options)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options):
        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise FileNotFoundError(f"reward model {path}: no {HEAD_FILE} (write one with save_pretrained)")
        # Unexpected keys are allowed: a full PickScore (CLIPModel) folder also holds the text tower we do not read.
        backbone, info = cls.backbone_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
        _check_loaded(path, info["missing_keys"], (), info["mismatched_keys"])
        head = nn.Linear(cls.head_width(backbone.config), 1)
        state = load_file(path / HEAD_FILE)
        _check_loaded(path / HEAD_FILE, set(head.state_dict()) - set(state), set(state) - set(head.state_dict()))
        head.load_state_dict(state)
        return cls(backbone, head, **options)

    def save_pretrained(self, directory: str | Path) -> None:
        self.backbone.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, Path(directory) / HEAD_FILE)

    def freeze(self, checkpointing: bool) -> "_FrozenScorer":
        """No parameter takes a gradient. transformers checkpoints its layers only in training mode; these models
        have no dropout (their configs set it to 0), so train() changes nothing else."""
        self.requires_grad_(False)
        if checkpointing:
            self.backbone.activation_checkpointing_enable()
        return self.train(checkpointing)


class ImageReward(_FrozenScorer):
    """PickScore-class image reward model: CLIP vision tower (ViT-H/14) -> projected, L2-normalised image
    embedding -> linear -> score. Input: frames [B, 3, H, W] in [-1, 1], resized and cropped as CLIP's processor does
    (shortest side to the model's image size, bicubic, centre crop), differentiably."""

    config_class, backbone_class, default_config = CLIPVisionConfig, CLIPVisionModelWithProjection, CLIP_VIT_H

    @staticmethod
    def head_width(config) -> int:
        return config.projection_dim

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        size = self.backbone.config.image_size
        height, width = frames.shape[-2:]
        scale = size / min(height, width)
        resized = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = F.interpolate(frames.float(), size=resized, mode="bicubic", antialias=True, align_corners=False)
        top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
        x = _normalize(x[..., top:top + size, left:left + size].clamp(-1, 1), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        embeds = self.backbone(pixel_values=x.to(self.head.weight.dtype)).image_embeds
        return self.head(F.normalize(embeds.float(), dim=-1).to(embeds.dtype)).float().squeeze(-1)


class VideoReward(_FrozenScorer):
    """VideoAlign-class video reward model: Qwen2-VL (2B) reads the video as VideoAlign's processor prepares it
    (frames at `sample_fps`, each resized to the pixel budget, Qwen2-VL's 2 x 14 x 14 patches), framed by the
    vision start / end tokens; a linear head on the last token's hidden state gives the score.
    Input: frames [B, 3, F, H, W] in [-1, 1] at `fps`."""

    config_class, backbone_class, default_config = Qwen2VLConfig, Qwen2VLModel, QWEN2_VL_2B

    def __init__(self, backbone, head, fps: float = 16.0, sample_fps: float = 2.0, min_pixels: int = 100_352,
                 max_pixels: int = 200_704) -> None:
        super().__init__(backbone, head)
        self.fps, self.sample_fps, self.min_pixels, self.max_pixels = fps, sample_fps, min_pixels, max_pixels
        self._positions: dict = {}

    @staticmethod
    def head_width(config) -> int:
        return config.text_config.hidden_size

    def frame_indices(self, count: int) -> torch.Tensor:
        """Frames read at `sample_fps`: transformers' Qwen2VLVideoProcessor.sample_frames rule (its floor to a
        multiple of the temporal patch, evenly spaced from frame 0)."""
        temporal = self.backbone.config.vision_config.temporal_patch_size
        wanted = max(temporal, math.floor(count / self.fps * self.sample_fps / temporal) * temporal)
        return torch.arange(0, count, count / min(wanted, count)).int()

    def sizes(self, frames: int, height: int, width: int):
        """(indices of the frames read, their resized (height, width), Qwen2-VL's patch grid (t, h, w)) for a
        video of `frames` frames of height x width; the size follows Qwen2-VL's smart_resize within the budget."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        vision = self.backbone.config.vision_config
        patch, temporal = vision.patch_size, vision.temporal_patch_size
        indices = self.frame_indices(frames)
        size = smart_resize(height, width, factor=patch * vision.spatial_merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return indices, size, (-(-len(indices) // temporal), size[0] // patch, size[1] // patch)

    def pixel_inputs(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, 3, F, H, W] in [-1, 1] -> (pixel_values_videos [B * t * h * w, 3 * 2 * 14 * 14] in Qwen2-VL's
        processor layout, differentiable with respect to the video; the patch grid (t, h, w) of each video)."""
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        vision = self.backbone.config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        indices, size, (t, h, w) = self.sizes(*video.shape[2:])
        frames = video[:, :, indices.to(video.device)].transpose(1, 2)  # [B, T, 3, H, W]
        batch, count = frames.shape[:2]
        x = F.interpolate(frames.flatten(0, 1).float(), size=size, mode="bicubic", antialias=True,
                          align_corners=False)
        x = _normalize(x.clamp(-1, 1), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).unflatten(0, (batch, count))
        if pad := -count % temporal:  # the processor repeats the last frame
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        x = x.view(batch, t, temporal, 3, h // merge, merge, patch, w // merge, merge, patch)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(batch * t * h * w, 3 * temporal * patch * patch)
        return x, (t, h, w)

    def layout(self, batch: int, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, ...]:
        """Token ids (vision start, the video's tokens, vision end), their modality types, video_grid_thw and
        Qwen2-VL's M-RoPE position ids for `batch` videos of patch grid `grid`. The position ids take index
        arithmetic on the ids; they are the same every step, so they are computed once per shape."""
        config = self.backbone.config
        tokens = math.prod(grid) // config.vision_config.spatial_merge_size ** 2
        ids = torch.tensor([config.vision_start_token_id] + [config.video_token_id] * tokens
                           + [config.vision_end_token_id], device=device).expand(batch, -1)
        types = (ids == config.video_token_id).int() * 2
        grid_thw = torch.tensor([grid] * batch, device=device)
        key = (batch, grid, str(device))
        if key not in self._positions:
            self._positions[key] = self.backbone.get_rope_index(ids, types, video_grid_thw=grid_thw)[0]
        return ids, types, grid_thw, self._positions[key]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        pixels, grid = self.pixel_inputs(video)
        ids, types, grid_thw, positions = self.layout(video.shape[0], grid, video.device)
        hidden = self.backbone(input_ids=ids, mm_token_type_ids=types, position_ids=positions,
                               pixel_values_videos=pixels.to(self.head.weight.dtype), video_grid_thw=grid_thw,
                               use_cache=False).last_hidden_state
        return self.head(hidden[:, -1]).float().squeeze(-1)


def _decode_frame(decoder, x: torch.Tensor, cache: list, first: bool):
    """One latent frame through diffusers' WanDecoder3d; returns its pixels and the causal caches after it, leaving
    the given cache list untouched so that a recomputation starts from the same state."""
    cache = list(cache)
    return decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first), cache


def decode(vae: VAE, latents: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Normalised latents [B, 16, f, h, w] -> frames [B, 3, 4(f - 1) + 1, 8h, 8w] in [-1, 1] (the VAE's dtype),
    differentiable with respect to the latents.

    With `checkpointing`, latent frame i is decoded as diffusers' `AutoencoderKLWan._decode` does it (one frame at
    a time, causal-convolution caches carried over) inside `torch.utils.checkpoint`: backward keeps the frame's
    input and the caches it hands on, and recomputes the frame's activations."""
    model = vae.model
    z = (latents.float() * vae.std.to(latents.device) + vae.mean.to(latents.device)).to(vae.dtype)
    if not (checkpointing and torch.is_grad_enabled()):
        return model.decode(z).sample
    if model.config.patch_size is not None:
        raise ValueError("vae_checkpointing supports Wan2.1's VAE (no patch_size); this VAE has "
                         f"patch_size={model.config.patch_size}")
    x = model.post_quant_conv(z)
    cache: list = [None] * model._cached_conv_counts["decoder"]
    frames = []
    for i in range(x.shape[2]):
        out, cache = checkpoint(_decode_frame, model.decoder, x[:, :, i:i + 1], cache, i == 0, use_reentrant=False)
        frames.append(out)
    return torch.cat(frames, dim=2).clamp(-1, 1)


class PixelScorer:
    """Predict x0 = x_k - sigma_k * v from step k, decode it with the frozen VAE and score the pixels with the frozen
    pixel reward model (an image model on frame 0, or a video model on every frame)."""

    name = "rgb_refl"

    def __init__(self, vae: VAE, reward_model: _FrozenScorer, frames: str, vae_checkpointing: bool = True) -> None:
        check_frozen(reward_model, "reward model", "RGB ReFL")
        if frames not in ("first", "all"):
            raise ValueError(f"frames={frames!r}: expected 'first' or 'all'")
        check_frozen(vae.model, "VAE", "RGB ReFL")
        self.vae, self.reward_model, self.frames, self.vae_checkpointing = vae, reward_model, frames, vae_checkpointing

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 [B, 16, f, h, w] -> the pixels the reward model reads: [B, 3, H, W] (first) or [B, 3, F, H, W]."""
        if self.frames == "first":
            return decode(self.vae, x0[:, :, :1], self.vae_checkpointing)[:, :, 0]
        return decode(self.vae, x0, self.vae_checkpointing)

    def __call__(self, rollout: Rollout, velocity: torch.Tensor) -> torch.Tensor:
        sigma = rollout.scheduler.sigmas[rollout.k].expand(rollout.x.shape[0]).to(rollout.x.device)
        return self.reward_model(self.decode(predict_x0(rollout.x, velocity, sigma))).float()


class RGBReFLStep(FeedbackStep):
    """The reward-feedback step with the pixel scorer; k is drawn from `prfl.stage` as for PRFL (RGB ReFL as
    published supervises late in the chain, where a one-step x0 prediction is a usable image:
    prfl.stage=last_quarter)."""

    def __init__(self, config: PRFLConfig, sampling: SamplingConfig, vae: VAE, reward_model: _FrozenScorer,
                 frames: str, vae_checkpointing: bool = True, null_context: torch.Tensor | None = None,
                 step_override: int | None = None) -> None:
        super().__init__(config, sampling, PixelScorer(vae, reward_model, frames, vae_checkpointing), null_context,
                         step_override)


def build_reward_model(config: RGBReFLConfig) -> _FrozenScorer:
    """The configured pixel reward model (image for `first`, video for `all`), not yet frozen or moved."""
    kind, options = (ImageReward, {}) if config.frames == "first" else \
        (VideoReward, dict(fps=config.fps, sample_fps=config.sample_fps, min_pixels=config.min_pixels,
                           max_pixels=config.max_pixels))
    if config.random_weights:
        return kind.random(config.reward_config, **options)
    return kind.from_pretrained(config.reward_path, **options)


def build_vae(config: RGBReFLConfig, device, dtype: torch.dtype) -> VAE:
    if not config.random_weights:
        return VAE.from_pretrained(config.vae_path, device, tiling=config.vae_tiling, dtype=dtype)
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(**config.vae_config)
    if config.vae_tiling:
        model.enable_tiling()
    return VAE(model, device, dtype)


def build_rgb_refl_step(run_config: RunConfig, config: RGBReFLConfig, device, dtype: torch.dtype,
                        null_context: torch.Tensor | None = None) -> RGBReFLStep:
    """The RGB ReFL reward step for a run: the VAE and the reward model of `config` (frozen, in `dtype` on
    `device`), the run's sampling chain, and its `prfl` section (stage, objective, weight, rollout guidance). Combine
    with the SFT loss like PRFL: `FeedbackWithSFTStep(step, sft_step, prfl.sft_weight)`."""
    if not config.random_weights and (config.vae_path is None or config.reward_path is None):
        raise ConfigError("rgb_refl needs rgb_refl.vae_path and rgb_refl.reward_path (or rgb_refl.random_weights="
                          "true, for benchmarks)")
    vae = build_vae(config, device, dtype)
    reward = build_reward_model(config).to(device, dtype).freeze(config.reward_checkpointing)
    return RGBReFLStep(run_config.prfl, run_config.sampling, vae, reward, config.frames, config.vae_checkpointing,
                       null_context)
