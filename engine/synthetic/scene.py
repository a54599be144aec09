"""A synthetic motion benchmark in latent space: videos whose motion quality an analytic judge can decide.

Stand-in for "videos rated by people" where no real weights or labelled videos can be downloaded. A latent video
[16, F, H, W] holds a scene background and one object: a Gaussian blob whose channel signature says its colour.
The object moves in one of four ways:

    smooth   constant velocity in the prompt's direction        good (the only good kind)
    jitter   the smooth path, jumping 2-3 px off it once         bad physics
    static   no motion                                           bad: no dynamics
    vanish   gone in some frames                                 bad structure

and, for reward-model data only (`data.synthetic_motions`; the base generator never sees it):

    wrong_way    smooth, in another direction than the prompt's    bad: does not follow the prompt
    wrong_start  smooth, from another place than the first frame   bad (first-frame variant): does not continue it

The first-frame variant (image-to-video; an i2v generator reads it): each video comes with its condition, the clean
first latent frame of a rendered smooth video of its prompt and seed, i.e. where the object starts. The i2v DiT reads
it as Wan reads an image, as a first-frame condition `y` (mask + that frame) and as toy CLIP features
(`image_features`: the frame's pixels as tokens); the generator must continue it, and the judge also checks that its
frame 0 puts the object where the condition does.

The scene is lit unevenly, as real scenes are: its light grows from left to right, from top to bottom and over the
clip (three background channels). That layout is what tells a DiT where and when a token is: with only rotary,
i.e. relative, positions, a generator trained on flat backgrounds moved its object in a random direction whatever
the prompt said (benchmarks/results/synthetic-lit-scene.md).

Rendered latents are scaled by LATENT_SCALE, as a VAE's latents are normalised before diffusion (Wan: per-channel
mean and std), so that the noise schedule meets signal-to-noise ratios of the order it was made for.

engine/synthetic/judge.py decides from the latents alone whether the motion is good for the prompt; dataset.py holds
the datasets and generation made of these scenes. The toy text encoder maps a prompt of the closed vocabulary to a
fixed embedding; it is a toy, not a language model. All of it is deterministic by seed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

import torch

from engine.model.encoders import first_frame_condition

COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
SCENES = ("beach", "forest", "city")
MOTIONS = ("smooth", "jitter", "static", "vanish")  # the base generator's even mix
KINDS = MOTIONS + ("wrong_way", "wrong_start")
PROMPTS = tuple(f"a {colour} ball moving {direction} in the {scene}"
                for colour, direction, scene in itertools.product(COLOURS, DIRECTIONS, SCENES))
VOCABULARY = tuple(sorted({word for prompt in PROMPTS for word in prompt.split()}))

CHANNELS = 16
# Small on purpose: the benchmark's base generator must learn it on 2 CPU cores in minutes. A slow, strong object
# on a flat background is what a tiny DiT learns fastest (benchmarks/results/synthetic-lit-scene.md).
SHAPE = (6, 8, 8)  # latent (frames, height, width)
TEXT_DIM = 32  # width of the toy text embedding
BLOB_SIGMA = 1.4  # object radius in latent pixels
AMPLITUDE = 3.0  # object peak along its colour signature
SPEED = (0.7, 0.9)  # smooth motion, latent pixels per frame
MARGIN = 1.2  # closest approach of a smooth path's centre to the frame's edge, latent pixels
JUMP = (2.0, 3.0)  # jitter: how far the path jumps, once, latent pixels
LIGHT = 1.0  # the scene's light gradients: each spans [-LIGHT, LIGHT] along x, y or time
NOISE = 0.05
# render() multiplies the scene by this: 1 / the RMS of a flat-lit scene (0.27); lit, the latents' RMS is about 1.5.
# At RMS 0.27, sigma 0.7 would be as noisy as sigma 0.9 is on unit-RMS latents.
LATENT_SCALE = 3.7


@dataclass(frozen=True)
class Prompt:
    colour: str
    direction: str
    scene: str


def parse_prompt(prompt: str) -> Prompt:
    """Read a prompt of the closed vocabulary; unknown words are an error that lists the vocabulary."""
    words = prompt.lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown word(s) {', '.join(unknown)}; the vocabulary is "
                         f"{', '.join(VOCABULARY)}")
    found = [[w for w in words if w in options] for options in (COLOURS, DIRECTIONS, SCENES)]
    if any(len(f) != 1 for f in found):
        raise ValueError(f"prompt {prompt!r}: expected one colour ({', '.join(COLOURS)}), one direction "
                         f"({', '.join(DIRECTIONS)}) and one scene ({', '.join(SCENES)}), e.g. {PROMPTS[0]!r}")
    return Prompt(found[0][0], found[1][0], found[2][0])


def _seeded(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def colour_signature(colour: str) -> torch.Tensor:
    """[16] unit vector: the object's channel pattern. Colours use disjoint channel groups 4..15."""
    index = COLOURS.index(colour)
    signature = torch.zeros(CHANNELS)
    signature[4 + 3 * index: 7 + 3 * index] = torch.tensor([1.0, 0.6, 0.3])
    return signature / signature.norm()


def scene_background(scene: str, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """[16, F, H, W]: levels specific to the scene on channels 0..3, plus its light, growing from left to right
    (channel 0), from top to bottom (channel 1) and over the clip (channel 2)."""
    frames, height, width = shape
    levels = torch.rand(4, generator=_seeded("scene", scene)) - 0.5
    background = torch.zeros(CHANNELS, *shape)
    background[:4] = levels.view(4, 1, 1, 1)
    background[0] += torch.linspace(-LIGHT, LIGHT, width).view(1, 1, width)
    background[1] += torch.linspace(-LIGHT, LIGHT, height).view(1, height, 1)
    background[2] += torch.linspace(-LIGHT, LIGHT, frames).view(frames, 1, 1)
    return background


def encode_prompt(prompt: str) -> torch.Tensor:
    """The toy text encoder: one fixed random [TEXT_DIM] vector per word, so a prompt is [words, TEXT_DIM]."""
    parse_prompt(prompt)
    return torch.stack([torch.randn(TEXT_DIM, generator=_seeded("word", w)) for w in prompt.lower().split()])


def null_prompt_embedding() -> torch.Tensor:
    """Embedding of the empty prompt (prompt dropout, classifier-free guidance): one zero token."""
    return torch.zeros(1, TEXT_DIM)


def _blob(height: int, width: int, cy: float, cx: float, sigma: float) -> torch.Tensor:
    y = torch.arange(height, dtype=torch.float32).view(-1, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, -1)
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


@dataclass(frozen=True)
class Look:
    """How the object and the noise look, apart from the motion: the benchmark's own values by default."""

    amplitude: float = AMPLITUDE
    blob_sigma: float = BLOB_SIGMA
    noise: float = NOISE


# Ranges of `varied_look`, as factors of the defaults. A generator's videos differ from rendered ones in exactly
# these (PRFL against a PAVRM that never saw them grew wide, bright, noisy objects: benchmarks/results/pavrm_shift.md).
VARIED_LOOK = {"amplitude": (0.8, 1.25), "blob_sigma": (0.75, 1.6), "noise": (0.5, 4.0)}


def varied_look(seed: int) -> Look:
    """A look drawn from a sample's seed alone, whatever its motion kind, so that no look goes with a label."""
    g = _seeded("look", seed)
    default = Look()
    return Look(**{name: getattr(default, name) * (lo + (hi - lo) * torch.rand(1, generator=g).item())
                   for name, (lo, hi) in VARIED_LOOK.items()})


def trajectory(prompt: str, motion: str, seed: int, shape: tuple[int, int, int] = SHAPE,
               speed: float | None = None) -> list[list[tuple]]:
    """Per frame, the list of blob centres (y, x): one centre, or none where the object vanished. `speed` (latent
    pixels per frame, >= 0) replaces the draw from SPEED, e.g. to render paths slower than the data's; the start is
    then drawn for that speed's travel, so it is not the default path's start."""
    if motion not in KINDS:
        raise ValueError(f"motion {motion!r}: expected one of {', '.join(KINDS)}")
    if motion == "wrong_start":  # a smooth path, but not the one whose first frame is the condition
        return trajectory(prompt, "smooth", wrong_start_seed(prompt, seed, shape), shape, speed)
    p = parse_prompt(prompt)
    frames, height, width = shape
    g = _seeded("trajectory", prompt, motion, seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(1, generator=g).item()

    direction = p.direction
    if motion == "wrong_way":
        others = [d for d in DIRECTIONS if d != p.direction]
        direction = others[int(torch.randint(len(others), (1,), generator=g))]
    dy, dx = DIRECTIONS[direction]
    if speed is not None and speed < 0:
        raise ValueError(f"speed={speed}: expected latent pixels per frame >= 0")
    speed = uniform(*SPEED) if speed is None else speed
    travel = speed * (frames - 1)

    def start_along(extent: float, d: float) -> float:
        """Start so that the whole path stays inside [MARGIN, extent - 1 - MARGIN]."""
        return uniform(MARGIN + max(0.0, -d * travel), extent - 1 - MARGIN - max(0.0, d * travel))

    cy, cx = start_along(height, dy), start_along(width, dx)
    path = [[(cy + dy * speed * f, cx + dx * speed * f)] for f in range(frames)]
    if motion in ("smooth", "wrong_way"):
        return path
    if motion == "static":  # where the smooth path is halfway
        return [[(cy + dy * travel / 2, cx + dx * travel / 2)] for _ in range(frames)]
    if motion == "jitter":
        return _jump(path, g, uniform, height, width)
    # vanish: the smooth path with the object gone in 1-2 frames
    for f in torch.randperm(frames, generator=g)[: 1 + int(torch.randint(2, (1,), generator=g))].tolist():
        path[f] = []
    return path


MIN_START_OFFSET = 2.0  # wrong_start: at least this far from the condition's start, latent pixels


def wrong_start_seed(prompt: str, seed: int, shape: tuple[int, int, int] = SHAPE) -> int:
    """The seed of a smooth path of the prompt that starts at least MIN_START_OFFSET from the start of `seed`'s."""
    start = torch.tensor(trajectory(prompt, "smooth", seed, shape)[0][0])
    for offset in range(1, 1000):
        other = seed + offset * 7_919
        if (torch.tensor(trajectory(prompt, "smooth", other, shape)[0][0]) - start).norm() >= MIN_START_OFFSET:
            return other
    raise ValueError(f"no start {MIN_START_OFFSET} px away from seed {seed}'s for {prompt!r}")


def _jump(path: list[list[tuple]], g: torch.Generator, uniform, height: int, width: int) -> list[list[tuple]]:
    """The path jumps JUMP px in a random direction at a random frame and goes on from there. Of up to 16 random
    directions the first that keeps the rest of the path inside the frame is taken (else the one that leaves it least),
    so the edge never shortens the jump."""
    frames = len(path)
    start = 1 + int(torch.randint(frames - 1, (1,), generator=g))
    distance = uniform(*JUMP)
    rest = torch.tensor([centres[0] for centres in path[start:]])
    best, least_outside = None, math.inf
    for angle in (2 * math.pi * torch.rand(16, generator=g)).tolist():
        moved = rest + distance * torch.tensor([math.sin(angle), math.cos(angle)])
        outside = ((0.5 - moved).clamp(min=0) + (moved - torch.tensor([height - 1.5, width - 1.5])).clamp(min=0)).sum()
        if outside < least_outside:
            best, least_outside = moved, outside.item()
        if least_outside == 0:
            break
    return path[:start] + [[(y, x)] for y, x in best.tolist()]


def render(prompt: str, motion: str, seed: int, shape: tuple[int, int, int] = SHAPE,
           speed: float | None = None, look: Look = Look()) -> torch.Tensor:
    """A latent video [16, F, H, W]: scene background + the object along its trajectory (at `speed`, if given) +
    small noise, as bright, wide and noisy as `look` says, scaled by LATENT_SCALE."""
    p = parse_prompt(prompt)
    frames, height, width = shape
    video = scene_background(p.scene, shape)
    signature = colour_signature(p.colour).view(-1, 1, 1)
    for f, centres in enumerate(trajectory(prompt, motion, seed, shape, speed)):
        for cy, cx in centres:
            video[:, f] += look.amplitude * signature * _blob(height, width, cy, cx, look.blob_sigma)
    noise = torch.randn(video.shape, generator=_seeded("noise", prompt, motion, seed))
    return LATENT_SCALE * (video + look.noise * noise)


# (physics_quality, human_quality) per motion, 1 = qualified, as in the reference meta files: jitter breaks physics,
# vanish breaks the object's structure, static has no dynamics (the low dynamic degree PRFL is meant to fix), and
# wrong_way and wrong_start are not what was asked for.
LABELS = {"smooth": (1, 1), "jitter": (0, 1), "static": (0, 1), "vanish": (1, 0), "wrong_way": (1, 0),
          "wrong_start": (1, 0)}


def labels(motion: str) -> dict:
    """Labels in the reference meta files' fields, with motion_quality = physics AND human."""
    physics, human = LABELS[motion]
    return {"physics_quality": physics, "human_quality": human, "motion_quality": physics & human, "motion": motion}


CONDITION_CHANNELS = 4 + CHANNELS  # y: Wan's 4 mask channels and the first latent frame
IMAGE_TOKENS, IMAGE_DIM = 257, CHANNELS  # the toy image encoder's output: as many tokens as Wan's CLIP ViT-H gives


def image_features(frame: torch.Tensor) -> torch.Tensor:
    """The toy image encoder: a first latent frame [16, H, W] -> [257, 16] tokens, its mean and then its H x W pixels
    (zero-padded), as Wan's CLIP gives 257 tokens of an image."""
    pixels = frame.flatten(1).t()
    tokens = torch.zeros(IMAGE_TOKENS, IMAGE_DIM)
    tokens[0] = pixels.mean(0)
    tokens[1:1 + len(pixels)] = pixels
    return tokens


def first_frame_inputs(prompt: str, motion: str, seed: int, shape: tuple[int, int, int] = SHAPE
                       ) -> dict[str, torch.Tensor]:
    """The condition of a video in the first-frame variant: the clean first latent frame of the rendered video, as
    toy CLIP features `clip_fea` [257, 16] and Wan's first-frame condition `y` [20, F, H, W]. A vanish video's is its
    smooth path's (its object may be gone in frame 0); a wrong_start video's is that of the seed's smooth path, which
    the video does not start from."""
    video = render(prompt, "smooth" if motion in ("vanish", "wrong_start") else motion, seed, shape)
    return {"clip_fea": image_features(video[:, 0]), "y": first_frame_condition(video, CONDITION_CHANNELS)}


def condition_frame(y: torch.Tensor) -> torch.Tensor:
    """The first latent frame [16, H, W] a first-frame condition `y` [20, F, H, W] holds."""
    return y[-CHANNELS:, 0]
