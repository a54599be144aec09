"""Generating videos from a trained generator: video size -> latent grid, seeded noise, a batch of prompts denoised
with the flow sampler (`engine.model.flow.sample`).

    shape = latent_shape(frames=81, height=480, width=832, patch_size=model.config.patch_size)   # (21, 60, 104)
    latents = sample_videos(model, contexts, seeds, shape, negative_context, steps=40, guidance_scale=5.0)

Sizes follow Wan: F video frames (4n + 1) give (F - 1) / 4 + 1 latent frames, H x W pixels give H/8 x W/8 latent
pixels, and the latent grid must divide by the DiT's patch (1, 2, 2), so H and W are multiples of 16.

A video's initial noise is `torch.randn([C, f, h, w])` from a CPU generator seeded with its seed: what diffusers'
`WanPipeline` draws for one video with `generator=torch.Generator().manual_seed(seed)`, and the same whatever the
batch it is sampled in or the device it runs on.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from engine.model.dit import DiT
from engine.model.flow import sample

VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: (frames, height, width) per latent voxel
# Wan2.1's default negative prompt (`sample_neg_prompt` in wan/configs/shared_config.py); Wan's generate.py uses it
# when none is given. diffusers' WanPipeline defaults to "" instead and encodes it like any prompt.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                       "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def latent_shape(frames: int, height: int, width: int, patch_size: tuple[int, int, int] = (1, 2, 2),
                 stride: tuple[int, int, int] = VAE_STRIDE) -> tuple[int, int, int]:
    """Latent grid (f, h, w) of a video of `frames` x `height` x `width` pixels; a size the VAE and the DiT's patch
    cannot take exactly is an error naming it."""
    latent_frames = (frames - 1) // stride[0] + 1
    if frames < 1 or (frames - 1) % stride[0] or latent_frames % patch_size[0]:
        raise ValueError(f"frames={frames}: expected {stride[0]}n + 1 frames (the VAE's temporal stride "
                         f"{stride[0]}), e.g. {stride[0] * 20 + 1}")
    for name, size, s, p in (("height", height, stride[1], patch_size[1]), ("width", width, stride[2], patch_size[2])):
        if size < 1 or size % (s * p):
            raise ValueError(f"{name}={size}: expected a positive multiple of {s * p} (VAE stride {s} x DiT patch "
                             f"{p})")
    return latent_frames, height // stride[1], width // stride[2]


def i2v_size(image_width: int, image_height: int, area: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of an image-to-video clip as Wan sizes it: the image's aspect ratio at about `area` pixels
    (e.g. 832 x 480), each side rounded down to a multiple of the VAE stride x DiT patch (diffusers'
    WanImageToVideoPipeline example; Wan's generate.py for i2v does the same). A portrait image gives a portrait clip.
    """
    aspect = image_height / image_width
    height = round(math.sqrt(area * aspect)) // multiple * multiple
    width = round(math.sqrt(area / aspect)) // multiple * multiple
    if height < multiple or width < multiple:
        raise ValueError(f"an image of {image_width}x{image_height} at {area} pixels gives a {width}x{height} clip: "
                         f"expected both sides at least {multiple}")
    return width, height


def video_size(shape: tuple[int, int, int], stride: tuple[int, int, int] = VAE_STRIDE) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of a latent grid (f, h, w): the inverse of `latent_shape`."""
    return (shape[0] - 1) * stride[0] + 1, shape[1] * stride[1], shape[2] * stride[2]


def seeded_noise(seed: int, shape: tuple[int, int, int], channels: int = 16) -> torch.Tensor:
    """The initial noise [channels, f, h, w] (fp32, CPU) of the video with this seed."""
    return torch.randn(channels, *shape, generator=torch.Generator().manual_seed(seed))


def sample_videos(model: DiT, contexts: list[torch.Tensor], seeds: list[int], shape: tuple[int, int, int],
                  negative_context: torch.Tensor | None = None, *, steps: int = 40,
                  solver: Literal["euler", "unipc"] = "unipc", shift: float = 5.0, guidance_scale: float = 1.0,
                  clip_fea: list[torch.Tensor] | None = None, y: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Denoise one video per (context [L_i, text_dim], seed) in one batch; returns latents [B, C, f, h, w] (fp32,
    CPU). `negative_context` [L, text_dim] is shared by the batch (classifier-free guidance when the scale != 1).
    Image-to-video: `clip_fea` ([257, clip_dim] each) and `y` ([in_dim - C, f, h, w] each) condition every
    evaluation, the unconditional branch too (it drops only the prompt, as Wan's I2V pipeline does).
    `model` may be the DeepSpeed engine wrapping the DiT (ZeRO-3 gathers each layer's parameters as it runs)."""
    if len(contexts) != len(seeds):
        raise ValueError(f"{len(contexts)} contexts but {len(seeds)} seeds: expected one seed per video")
    for name, condition in (("clip_fea", clip_fea), ("y", y)):
        if condition is not None and len(condition) != len(seeds):
            raise ValueError(f"{len(condition)} {name} tensors for {len(seeds)} videos: expected one per video")
    device = next(model.parameters()).device
    channels = getattr(model, "module", model).config.out_dim
    noise = torch.stack([seeded_noise(seed, shape, channels) for seed in seeds]).to(device)
    # Zero-padding the prompts to the batch's longest changes nothing: the DiT zero-pads every prompt to text_len.
    context = torch.nn.utils.rnn.pad_sequence(list(contexts), batch_first=True).to(device)
    negative = None if negative_context is None else negative_context.expand(len(seeds), -1, -1).to(device)
    image = None if clip_fea is None else torch.stack(clip_fea).to(device)
    condition = None if y is None else torch.stack(y).to(device)
    latents = sample(lambda x, t, c: model(x, t, c, clip_fea=image, y=condition), noise, context, steps=steps,
                     solver=solver, shift=shift, guidance_scale=guidance_scale, negative_context=negative)
    return latents.cpu()
