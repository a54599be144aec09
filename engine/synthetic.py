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
the prompt said (README, Known limitations).

Rendered latents are scaled by LATENT_SCALE, as a VAE's latents are normalised before diffusion (Wan: per-channel
mean and std), so that the noise schedule meets signal-to-noise ratios of the order it was made for.

`judge` decides from the latents alone whether the motion is good for the prompt, and returns the measurements
behind the verdict. The toy text encoder maps a prompt of the closed vocabulary to a fixed embedding; it is a toy,
not a language model. All of it is deterministic by seed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from dataclasses import asdict, dataclass

import torch

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
# on a flat background is what a tiny DiT learns fastest (README, Known limitations).
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
# these (PRFL against a PAVRM that never saw them grew wide, bright, noisy objects: README, PRFL fine-tuning).
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
    from engine.data import first_frame_condition

    video = render(prompt, "smooth" if motion in ("vanish", "wrong_start") else motion, seed, shape)
    return {"clip_fea": image_features(video[:, 0]), "y": first_frame_condition(video, CONDITION_CHANNELS)}


def condition_frame(y: torch.Tensor) -> torch.Tensor:
    """The first latent frame [16, H, W] a first-frame condition `y` [20, F, H, W] holds."""
    return y[-CHANNELS:, 0]


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


# ---------------------------------------------------------------------------------------------------------------
# The judge


@dataclass
class Verdict:
    passed: bool
    detected_frames: int  # frames with exactly one object of the prompt's colour
    max_components: int  # most separate objects seen in one frame
    displacement: float  # |last - first| position, latent pixels
    direction_cosine: float  # cosine between the displacement and the prompt's direction
    max_jump: float  # largest frame-to-frame step
    max_acceleration: float  # largest change of velocity between consecutive steps
    positions: list[tuple[float, float]]  # object centre per frame (nan where not found)
    conditioned: bool = False  # judged against a first-frame condition (the i2v variant)
    start_distance: float = math.nan  # first-frame variant: frame 0's object from the condition's, latent pixels

    def to_dict(self) -> dict:
        return asdict(self)


DETECT_THRESHOLD = 0.35 * AMPLITUDE  # colour-projection peak that counts as an object
MIN_DISPLACEMENT = 2.1  # 60% of the shortest smooth travel (3.5-4.5 px)
MIN_COSINE = 0.8
MAX_ACCELERATION = 1.0
MAX_JUMP = 1.6  # a smooth step is at most 0.9 px
MAX_START_DISTANCE = 1.0  # first-frame variant: frame 0 within this of the condition's start (a wrong start: >= 2)


def _components(mask: torch.Tensor) -> list[torch.Tensor]:
    """4-connected components of a boolean [H, W] mask, as lists of (y, x) indices."""
    seen, comps = torch.zeros_like(mask), []
    for y, x in mask.nonzero().tolist():
        if seen[y, x]:
            continue
        stack, comp = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(torch.tensor(comp))
    return comps


def _track(response: torch.Tensor) -> tuple[list[tuple[float, float]], int, int]:
    """Per frame of a colour response [F, H, W], the centre of the one object it shows (nan if not exactly one);
    the frames with one object; the most objects in a frame."""
    positions, detected, most = [], 0, 0
    for frame in response:
        comps = [c for c in _components(frame > DETECT_THRESHOLD * 0.5) if frame[c[:, 0], c[:, 1]].max() > DETECT_THRESHOLD]
        most = max(most, len(comps))
        if len(comps) == 1:
            detected += 1
            weights = frame[comps[0][:, 0], comps[0][:, 1]]
            positions.append(tuple((comps[0].float() * weights[:, None]).sum(0).div(weights.sum()).tolist()))
        else:
            positions.append((math.nan, math.nan))
    return positions, detected, most


def judge(latents: torch.Tensor, prompt: str, condition: torch.Tensor | None = None) -> Verdict:
    """Decide whether a latent video [16, F, H, W] shows one object of the prompt's colour moving smoothly, far
    enough, in the prompt's direction, in every frame; in the first-frame variant also whether it starts where the
    condition (its first latent frame [16, H, W]) puts the object."""
    p = parse_prompt(prompt)
    signature = colour_signature(p.colour)
    response = torch.einsum("cfhw,c->fhw", latents.float() / LATENT_SCALE, signature)
    positions, detected, most = _track(response)
    track = torch.tensor(positions)
    frames = len(positions)
    if detected == frames and frames >= 3:
        steps = track[1:] - track[:-1]
        displacement_vec = track[-1] - track[0]
        displacement = displacement_vec.norm().item()
        direction = torch.tensor(DIRECTIONS[p.direction])
        cosine = (displacement_vec @ direction / max(displacement, 1e-6)).item()
        max_jump = steps.norm(dim=1).max().item()
        max_acceleration = (steps[1:] - steps[:-1]).norm(dim=1).max().item()
    else:
        displacement = cosine = max_jump = max_acceleration = math.nan
    start_distance = math.nan
    if condition is not None:
        (start,), _, _ = _track(torch.einsum("chw,c->hw", condition.float() / LATENT_SCALE, signature)[None])
        start_distance = (torch.tensor(positions[0]) - torch.tensor(start)).norm().item()
    passed = (detected == frames and displacement >= MIN_DISPLACEMENT and cosine >= MIN_COSINE
              and max_acceleration <= MAX_ACCELERATION and max_jump <= MAX_JUMP
              and (condition is None or start_distance <= MAX_START_DISTANCE))
    return Verdict(bool(passed), detected, most, displacement, cosine, max_jump, max_acceleration, positions,
                   condition is not None, start_distance)


# ---------------------------------------------------------------------------------------------------------------
# Generating and judging sets of videos


def held_out_pairs(count: int, seed: int = 10_000) -> list[tuple[str, int]]:
    """(prompt, noise seed) pairs for evaluation, cycling through every prompt; seeds disjoint from training."""
    return [(PROMPTS[i % len(PROMPTS)], seed + i) for i in range(count)]


@torch.no_grad()
def generate(model, pairs: list[tuple[str, int]], steps: int = 20, solver: str = "unipc", shift: float = 3.0,
             guidance_scale: float = 1.0, batch_size: int = 16) -> torch.Tensor:
    """Sample latents [N, 16, F, H, W] from a DiT with the project's sampler, one noise seed per pair (the noise
    `runners/sample.py --synthetic` draws for that seed); an i2v DiT is conditioned on each pair's first frame
    (`first_frame_inputs` of its rendered smooth video)."""
    from engine.generate import sample_videos

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


# summary key -> the Verdict measurement it is the median of
TRACK_MEDIANS = {"median_direction_cosine": "direction_cosine", "median_displacement_px": "displacement",
                 "median_max_jump_px": "max_jump", "median_max_acceleration_px": "max_acceleration"}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95% by default): honest near 0 and 1 and on small samples."""
    if n == 0:
        return math.nan, math.nan
    rate = successes / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _spread(groups: dict[str, list[tuple[float, float]]]) -> float:
    """Mean over prompts of the spread (norm of the per-axis standard deviation) of a point across their seeds."""
    spreads = [torch.tensor(points).std(dim=0).norm().item() for points in groups.values() if len(points) >= 2]
    return sum(spreads) / len(spreads) if spreads else math.nan


def summarize(verdicts: list[Verdict], prompts: list[str]) -> dict:
    """Pass rate (with its Wilson 95% interval), detection rates, diversity and the medians of the judge's track
    measurements; in the first-frame variant also the share of videos that start where their condition does
    (first_frame_rate, with its interval).

    detected_rate counts the samples where the judge finds the prompt's object, i.e. one object of its colour in
    most frames; tracked_rate those where it finds it in every frame. A vanish sample loses its object in 1-2
    frames by design, so a generator that learned the even mix of motions scores about 1.0 and 0.75 on them.
    Diversity: trajectory_spread_px, the spread of start positions across seeds of one prompt, and motion_spread_px,
    that of the displacement (last - first position): in the first-frame variant the condition fixes the start, so
    the motion's spread is the generator's own. The medians, over tracked samples, say why samples fail: a direction
    cosine near 0 means the prompt's direction is not followed; a largest acceleration far above the rendered
    data's means the object is placed anew in every frame instead of moving.
    """
    starts, moves = {}, {}
    for v, prompt in zip(verdicts, prompts):
        first, last = v.positions[0], v.positions[-1]
        if not math.isnan(first[0]):
            starts.setdefault(prompt, []).append(first)
            if not math.isnan(last[0]):
                moves.setdefault(prompt, []).append((last[0] - first[0], last[1] - first[1]))
    n, passed = len(verdicts), sum(v.passed for v in verdicts)
    low, high = wilson_interval(passed, n)
    summary = {"samples": n, "pass_rate": passed / n, "pass_rate_ci95_low": low, "pass_rate_ci95_high": high,
               "detected_rate": sum(2 * v.detected_frames > len(v.positions) for v in verdicts) / n,
               "tracked_rate": sum(v.detected_frames == len(v.positions) for v in verdicts) / n,
               "trajectory_spread_px": _spread(starts), "motion_spread_px": _spread(moves),
               **{key: _median([getattr(v, field) for v in verdicts]) for key, field in TRACK_MEDIANS.items()}}
    if any(v.conditioned for v in verdicts):
        adhered = sum(v.start_distance <= MAX_START_DISTANCE for v in verdicts)
        low, high = wilson_interval(adhered, n)
        summary.update(first_frame_rate=adhered / n, first_frame_rate_ci95_low=low, first_frame_rate_ci95_high=high,
                       median_start_distance_px=_median([v.start_distance for v in verdicts]))
    return summary


def _median(values: list[float]) -> float:
    """Median of the measured values; nan where the judge measured none (no sample tracked in every frame)."""
    measured = [v for v in values if not math.isnan(v)]
    return statistics.median(measured) if measured else math.nan
