"""The synthetic benchmark as a data source of the engine: its rendered dataset, held-out pairs, generation, and the
registrations that plug it in (importing engine.synthetic runs them): the DiT presets of its generator, the data
source `synthetic` (labels, preference pairs, held-out seeds, evaluation prompts, the judge) and the check of
`data.synthetic_motions`.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.config import DATA_CHECKS, DataConfig
from engine.data.datasets import DataSource, Prompts, ValidationPrompt, register_source
from engine.data.format import LABEL_FIELDS
from engine.errors import ConfigError
from engine.model.dit import PRESETS, DiTConfig
from engine.model.sampling import sample_videos
from engine.synthetic.judge import judge, summarize
from engine.synthetic.scene import (
    KINDS,
    MOTIONS,
    PROMPTS,
    SHAPE,
    Look,
    condition_frame,
    encode_prompt,
    first_frame_inputs,
    labels,
    null_prompt_embedding,
    render,
    varied_look,
)

# The benchmark's generator. Its toy prompts have 9 tokens: padded to Wan's 512, cross-attention and the text MLP
# would be most of a step's cost (16 makes a step 2.3x cheaper).
PRESETS["synthetic"] = DiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=3, text_dim=32, text_len=16,
                                 freq_dim=64)
# Its first-frame (image-to-video) variant: the 4 + 16 condition channels and the toy image encoder's 16-wide tokens
# (scene.image_features).
PRESETS["synthetic-i2v"] = DiTConfig(model_type="i2v", in_dim=36, dim=128, ffn_dim=256, num_heads=4, num_layers=3,
                                     text_dim=32, text_len=16, freq_dim=64, clip_dim=16)


class SyntheticMotion(torch.utils.data.Dataset):
    """Rendered on the fly: sample i is PROMPTS[i % 48] with motion motions[(i // 48) % len(motions)] (an even mix)
    and seed `seed * 1_000_003 + i`, with the benchmark's look or, with `varied_looks` (reward-model data), a look
    drawn per sample (`varied_look`). Its dict also carries the labels (as tensors) for reward-model training and,
    with `first_frame` (the i2v variant), the video's condition (`first_frame_inputs`), rendered in the benchmark's
    own look."""

    def __init__(self, num_samples: int, seed: int = 0, motions: tuple[str, ...] = MOTIONS,
                 varied_looks: bool = False, first_frame: bool = False) -> None:
        self.num_samples, self.seed, self.motions, self.varied_looks = num_samples, seed, motions, varied_looks
        self.first_frame = first_frame
        self.null_context = null_prompt_embedding()

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> tuple[str, str, int]:
        prompt = PROMPTS[index % len(PROMPTS)]
        motion = self.motions[(index // len(PROMPTS)) % len(self.motions)]
        return prompt, motion, self.seed * 1_000_003 + index

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt, motion, seed = self.describe(index)
        label = labels(motion)
        look = varied_look(seed) if self.varied_looks else Look()
        sample = {"latents": render(prompt, motion, seed, look=look), "context": encode_prompt(prompt),
                  **{k: torch.tensor(float(label[k])) for k in ("physics_quality", "human_quality", "motion_quality")}}
        return {**sample, **first_frame_inputs(prompt, motion, seed)} if self.first_frame else sample


def held_out_pairs(count: int, seed: int = 10_000) -> list[tuple[str, int]]:
    """(prompt, noise seed) pairs for evaluation, cycling through every prompt; seeds disjoint from training."""
    return [(PROMPTS[i % len(PROMPTS)], seed + i) for i in range(count)]


@torch.no_grad()
def generate(model, pairs: list[tuple[str, int]], steps: int = 20, solver: str = "unipc", shift: float = 3.0,
             guidance_scale: float = 1.0, batch_size: int = 16) -> torch.Tensor:
    """Sample latents [N, 16, F, H, W] from a DiT with the project's sampler, one noise seed per pair (the noise
    `runners/sample.py --synthetic` draws for that seed); an i2v DiT is conditioned on each pair's first frame
    (`first_frame_inputs` of its rendered smooth video)."""
    first_frame = getattr(model, "module", model).config.model_type == "i2v"
    outputs = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        conditions = [first_frame_inputs(p, "smooth", s) for p, s in chunk] if first_frame else []
        outputs.append(sample_videos(model, [encode_prompt(p) for p, _ in chunk], [s for _, s in chunk], SHAPE,
                                     null_prompt_embedding(), steps=steps, solver=solver, shift=shift,
                                     guidance_scale=guidance_scale,
                                     **({k: [c[k] for c in conditions] for k in ("clip_fea", "y")} if first_frame
                                        else {})))
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------------------------
# The data source


def _check_motions(data: DataConfig) -> None:
    if data.synthetic_motions is not None and (not data.synthetic_motions
                                               or any(m not in KINDS for m in data.synthetic_motions)):
        raise ConfigError(f"data.synthetic_motions={data.synthetic_motions}: expected motion kinds from "
                          f"{', '.join(KINDS)}")


def _dataset(data: DataConfig, model: DiTConfig, seed: int, required_fields: tuple[str, ...]) -> SyntheticMotion:
    motions = tuple(data.synthetic_motions or MOTIONS)
    first_frame = model.model_type == "i2v"  # the first-frame variant: an i2v generator reads its condition
    if "wrong_start" in motions and not first_frame:
        raise ValueError(f"data.synthetic_motions={list(motions)}: wrong_start is a kind of the first-frame "
                         f"(image-to-video) variant; this {model.model_type} model has no first frame to miss")
    return SyntheticMotion(data.num_samples, seed=seed, motions=motions, varied_looks=data.synthetic_varied_looks,
                           first_frame=first_frame)


def preference_pairs(dataset: SyntheticMotion) -> list[tuple[int, int]]:
    """Every bad-motion sample against the smooth sample of its prompt and round."""
    by_key = {}
    for index in range(len(dataset)):
        prompt, motion, _ = dataset.describe(index)
        round_of = index // (len(dataset.motions) * len(PROMPTS))
        by_key.setdefault((round_of, prompt), {}).setdefault(motion, []).append(index)
    pairs = []
    for motions in by_key.values():
        for motion, indices in motions.items():
            if motion != "smooth" and "smooth" in motions:
                pairs += [(motions["smooth"][0], i) for i in indices]
    return pairs


def _held_out(data: DataConfig, seed: int) -> tuple[DataConfig, int]:
    # Samples are rendered from (seed, index): another seed gives held-out videos. Varied looks are a training
    # augmentation: validation scores the benchmark's own renders.
    return dataclasses.replace(data, num_samples=data.val_num_samples, synthetic_varied_looks=False), seed + 1


def _prompts(data: DataConfig, model: DiTConfig, count: int, seed: int) -> Prompts:
    """Held-out (prompt, seed) pairs; the first-frame variant conditions each on the first frame of its rendered
    smooth video."""
    condition = (lambda p, s: first_frame_inputs(p, "smooth", s)) if model.model_type == "i2v" else \
        (lambda p, s: {})
    return [ValidationPrompt(encode_prompt(p), p, s, **condition(p, s)) for p, s in held_out_pairs(count, seed)], SHAPE


def _judge(latents: torch.Tensor, prompts: list[ValidationPrompt]) -> dict[str, float]:
    summary = summarize([judge(video, p.prompt, None if p.y is None else condition_frame(p.y))
                         for video, p in zip(latents, prompts)], [p.prompt for p in prompts])
    return {key: value for key, value in summary.items() if key != "samples"}


DATA_CHECKS.append(_check_motions)
register_source("synthetic", DataSource(dataset=_dataset, prompts=_prompts, labels=LABEL_FIELDS,
                                        held_out=_held_out, pairs=preference_pairs, judge=_judge))
