"""The frozen models around the DiT, loaded from local paths only, used the way Wan2.1 and diffusers' Wan pipelines
use them: the VAE (diffusers `AutoencoderKLWan`), the umT5-XXL text encoder and, for i2v, the CLIP ViT-H/14 image
encoder (transformers); and Wan's i2v first-frame condition.

A diffusers Wan2.1 pipeline folder (`Wan-AI/Wan2.1-*-Diffusers`) holds them as `vae/`, `text_encoder/`,
`tokenizer/`, `image_encoder/` and `image_processor/`; the VAE also loads from the original `Wan2.1_VAE.pth`.
Loading is strict: a weight missing from a checkpoint is an error naming the file and the keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def first_frame_mask(channels: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The mask part of Wan's i2v condition: [channels, f, h, w], ones on latent frame 0 (the given frame)."""
    mask = torch.zeros(channels, *shape)
    mask[:, 0] = 1
    return mask


def first_frame_condition(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Wan's i2v condition: a mask (ones on latent frame 0) followed by the first frame's latent, zeros after."""
    condition = torch.zeros_like(latents)
    condition[:, 0] = latents[:, 0]
    return torch.cat([first_frame_mask(channels - latents.shape[0], latents.shape[1:]), condition])


def _check_loaded(path: Path, missing, unexpected=(), mismatched=()) -> None:
    problems = [f"{what}: {', '.join(map(str, keys[:8]))}{' ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing", list(missing)), ("unexpected", list(unexpected)),
                                   ("wrong shape", list(mismatched))) if keys]
    if problems:
        raise ValueError(f"{path}: the checkpoint does not fit the model ({'; '.join(problems)})")


def _require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


class VAE:
    """Wan2.1's VAE: RGB frames [3, F, H, W] in [-1, 1], F = 4n + 1 <-> normalised latents [16, n + 1, H/8, W/8].

    Latents are the posterior mean (Wan's `encode`, diffusers' `sample_mode="argmax"`), normalised per channel with
    the config's `latents_mean` / `latents_std` as the Wan pipelines do: z = (mean - latents_mean) / latents_std.
    """

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        config = model.config
        self.mean = torch.tensor(config.latents_mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std).view(-1, 1, 1, 1)
        self.temporal_stride = 2 ** sum(config.temperal_downsample)
        self.spatial_stride = 2 ** len(config.temperal_downsample)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", tiling: bool = False,
                        slicing: bool = False, dtype: torch.dtype = torch.float32) -> "VAE":
        """A diffusers `AutoencoderKLWan` folder, or a single checkpoint file (the original `Wan2.1_VAE.pth`, or
        .safetensors) with Wan2.1's architecture. `tiling` encodes/decodes in overlapping spatial tiles (less
        memory at 720P, slightly different numbers); `slicing` decodes a batch one video at a time."""
        from diffusers import AutoencoderKLWan

        path = _require(path, "VAE")
        if path.is_dir():
            model, info = AutoencoderKLWan.from_pretrained(path, local_files_only=True, output_loading_info=True)
            _check_loaded(path, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
        else:
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
            from safetensors.torch import load_file

            state = load_file(path) if path.suffix == ".safetensors" else \
                torch.load(path, map_location="cpu", weights_only=True)
            # diffusers' own single-file conversion; Wan2.1's VAE is the class's default architecture (its
            # from_single_file would fetch that config from the Hub).
            model = AutoencoderKLWan()
            state, expected = convert_wan_vae_to_diffusers(state), model.state_dict()
            _check_loaded(path, [k for k in expected if k not in state], [k for k in state if k not in expected],
                          [k for k in state if k in expected and state[k].shape != expected[k].shape])
            model.load_state_dict(state)
        if tiling:
            model.enable_tiling()
        if slicing:
            model.enable_slicing()
        return cls(model, device, dtype)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return (frames - 1) // self.temporal_stride + 1, height // self.spatial_stride, width // self.spatial_stride

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1] -> normalised latents [16, (F - 1) / 4 + 1, H / 8, W / 8] (fp32, on the CPU)."""
        channels, count, height, width = frames.shape
        if channels != 3 or (count - 1) % self.temporal_stride or height % self.spatial_stride or \
                width % self.spatial_stride:
            raise ValueError(f"frames must be [3, {self.temporal_stride}n+1, H, W] with H, W divisible by "
                             f"{self.spatial_stride}; got {tuple(frames.shape)}")
        posterior = self.model.encode(frames[None].to(self.device, self.dtype)).latent_dist
        return ((posterior.mode()[0].float().cpu() - self.mean) / self.std).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, f, h, w] (or one [16, f, h, w]) -> frames [B, 3, 4(f-1)+1, 8h, 8w] in [-1, 1]."""
        single = latents.ndim == 4
        z = latents[None] if single else latents
        z = z.float().cpu() * self.std + self.mean
        frames = self.model.decode(z.to(self.device, self.dtype)).sample.float().cpu()
        return frames[0] if single else frames

    def i2v_condition(self, frames: torch.Tensor) -> torch.Tensor:
        """Wan's i2v condition `y` [4 + 16, f, h, w] for a clip [3, F, H, W]: the first-frame mask (ones on latent
        frame 0; 4 channels, one per video frame a latent frame covers) and the normalised VAE encoding of the
        first frame followed by F - 1 black (zero) frames (diffusers' `WanImageToVideoPipeline.prepare_latents`)."""
        video = torch.cat([frames[:, :1], torch.zeros_like(frames[:, 1:])], dim=1)
        condition = self.encode(video)
        return torch.cat([first_frame_mask(self.temporal_stride, condition.shape[1:]), condition])


class TextEncoder:
    """umT5-XXL as Wan uses it: each prompt cleaned (ftfy, HTML entities, whitespace), tokenised with the
    end-of-sequence token and truncated to `max_length` (512), encoded with its attention mask; only the prompt's
    real tokens are kept, [L <= 512, 4096]. The DiT zero-pads to 512, which is what diffusers' `WanPipeline`
    does here instead (`_get_t5_prompt_embeds`): the model sees the same numbers."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_length: int = 512) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_path = _require(model_path, "text encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(_require(tokenizer_path, "tokenizer"), local_files_only=True)
        self.model, info = UMT5EncoderModel.from_pretrained(model_path, dtype=dtype, local_files_only=True,
                                                            output_loading_info=True)
        _check_loaded(model_path, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
        self.device, self.max_length = torch.device(device), max_length
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [L_i, dim] fp32 tensor per prompt (on the CPU), L_i its token count with the end-of-sequence token."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), mask).last_hidden_state.float().cpu()
        return [h[:n].contiguous() for h, n in zip(hidden, mask.gt(0).sum(dim=1).tolist())]


class ImageEncoder:
    """CLIP ViT-H/14 as Wan's i2v uses it: the image processor's resize, crop and normalisation, then the hidden
    states of the penultimate layer, [257, 1280] (CLS + 16 x 16 patches), as diffusers'
    `WanImageToVideoPipeline.encode_image` computes them."""

    def __init__(self, model_path: str | Path, processor_path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        model_path = _require(model_path, "image encoder")
        self.processor = CLIPImageProcessor.from_pretrained(_require(processor_path, "image processor"),
                                                            local_files_only=True)
        self.model, info = CLIPVisionModel.from_pretrained(model_path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
        _check_loaded(model_path, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """An RGB image [3, H, W] in [-1, 1] -> [257, hidden] fp32 (on the CPU)."""
        pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        inputs = self.processor(images=np.ascontiguousarray(pixels), return_tensors="pt")
        pixel_values = inputs.pixel_values.to(self.device, self.model.dtype)
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return hidden[0].float().cpu().contiguous()


def image_conditions(frames: torch.Tensor, image_encoder: ImageEncoder, vae: VAE) -> dict[str, torch.Tensor]:
    """Wan's i2v conditions of a clip [3, F, H, W] in [-1, 1], of which only the first frame is read: `clip_fea`, that
    frame's CLIP features [257, clip_dim], and `y`, the first-frame condition [4 + 16, f, h, w] (VAE.i2v_condition).
    Preprocessing (from a video's first frame) and sampling (from an image) build them alike."""
    return {"clip_fea": image_encoder.encode(frames[:, 0]), "y": vae.i2v_condition(frames)}
