"""The synthetic benchmark's judge: whether a latent video is good for its prompt, decided from the latents alone by
tracking the object of the prompt's colour, and the summary of a set of verdicts (pass rate with its Wilson interval,
which tests failed how often, detection, diversity, the track's medians, first-frame adherence).

A video passes when every test holds; `Verdict.failed` names those that did not:

    tracked       exactly one object of the prompt's colour in every frame
    size, peak,   in every frame the object is as large, as bright and as pure in colour as rendered objects are
    purity        (OBJECT_RANGES): a generator cannot pass with a bloated, glaring or off-colour object
    displacement  it travels far enough
    direction     in the prompt's direction
    jump,         without jumps or changes of speed (the physics)
    acceleration
    start         first-frame variant: frame 0 puts it where the condition does

The object tests close a hole a reward can exploit: PRFL against a PAVRM that rewards a trait of the object it never
saw vary (PRFL without SFT) made objects about twice as wide and brighter, which a path-only judge passed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from engine.evaluation import wilson_interval
from engine.synthetic.scene import AMPLITUDE, DIRECTIONS, LATENT_SCALE, colour_signature, parse_prompt


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
    failed: list[str] = field(default_factory=list)  # the tests that did not hold (TESTS), in their order
    # the object's extremes over the frames it was found in (nan where it never was)
    min_size: float = math.nan
    max_size: float = math.nan
    min_peak: float = math.nan
    max_peak: float = math.nan
    min_purity: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


DETECT_THRESHOLD = 0.35 * AMPLITUDE  # colour-projection peak that counts as an object
MIN_DISPLACEMENT = 2.1  # 60% of the shortest smooth travel (3.5-4.5 px)
MIN_COSINE = 0.8
MAX_ACCELERATION = 1.0
MAX_JUMP = 1.6  # a smooth step is at most 0.9 px
MAX_START_DISTANCE = 1.0  # first-frame variant: frame 0 within this of the condition's start (a wrong start: >= 2)
# The object as rendered, over 500 seeds x 6 frames: 16-25 pixels above half the detection threshold, a peak of
# 2.62-3.12 along its colour signature, colour purity >= 0.999 (cosine of its colour channels with the signature).
# The ranges allow about 35% on size and 40% / 15% below / above on the peak, so that a generator's imperfect but
# fair objects pass (the i2v base's: 12-29 px, peaks 1.85-3.51); an object 1.5x as wide as rendered measures
# 27-50 px, one twice as wide 43-64.
OBJECT_RANGES = {"size": (10.0, 32.0), "peak": (0.6 * AMPLITUDE, 1.2 * AMPLITUDE), "purity": (0.95, 1.0)}
TESTS = ("tracked", "size", "peak", "purity", "displacement", "direction", "jump", "acceleration", "start")


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


@dataclass
class _Track:
    positions: list[tuple[float, float]]  # the object's centre per frame (nan where not exactly one object)
    detected: int  # frames with exactly one object
    most: int  # the most objects in one frame
    objects: list[tuple[float, float, float]]  # (size, peak, purity) per frame with one object


def _track(video: torch.Tensor, signature: torch.Tensor) -> _Track:
    """Follow the object of colour `signature` through an unscaled video [16, F, H, W]: per frame, the components
    of its colour response above half the detection threshold whose peak passes it; with exactly one, its
    response-weighted centre, its size (pixels), peak and colour purity (cosine of its response-weighted colour
    channels 4..15 with the signature)."""
    track = _Track([], 0, 0, [])
    for frame, response in zip(video.unbind(1), torch.einsum("cfhw,c->fhw", video, signature)):
        comps = [c for c in _components(response > DETECT_THRESHOLD * 0.5)
                 if response[c[:, 0], c[:, 1]].max() > DETECT_THRESHOLD]
        track.most = max(track.most, len(comps))
        if len(comps) != 1:
            track.positions.append((math.nan, math.nan))
            continue
        (comp,) = comps
        weights = response[comp[:, 0], comp[:, 1]]
        track.detected += 1
        track.positions.append(tuple((comp.float() * weights[:, None]).sum(0).div(weights.sum()).tolist()))
        colour = (frame[4:, comp[:, 0], comp[:, 1]] * weights).sum(1)
        track.objects.append((float(len(comp)), weights.max().item(),
                              (colour @ signature[4:] / colour.norm().clamp(min=1e-12)).item()))
    return track


def judge(latents: torch.Tensor, prompt: str, condition: torch.Tensor | None = None) -> Verdict:
    """Decide whether a latent video [16, F, H, W] shows one object of the prompt's colour moving smoothly, far
    enough, in the prompt's direction, in every frame; in the first-frame variant also whether it starts where the
    condition (its first latent frame [16, H, W]) puts the object."""
    p = parse_prompt(prompt)
    signature = colour_signature(p.colour)
    found = _track(latents.float() / LATENT_SCALE, signature)
    positions, detected = found.positions, found.detected
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
        (start,) = _track(condition.float()[:, None] / LATENT_SCALE, signature).positions
        start_distance = (torch.tensor(positions[0]) - torch.tensor(start)).norm().item()
    # A test reads what could be measured: the object tests the frames it was found in, the path tests a path
    # found in every frame; where that is missing, "tracked" is the test that failed.
    tracked = detected == frames
    measured = list(zip(*found.objects)) if found.objects else [[] for _ in OBJECT_RANGES]
    held = {"tracked": tracked,
            **{name: all(low <= v <= high for v in values)
               for (name, (low, high)), values in zip(OBJECT_RANGES.items(), measured)},
            "displacement": not tracked or displacement >= MIN_DISPLACEMENT,
            "direction": not tracked or cosine >= MIN_COSINE, "jump": not tracked or max_jump <= MAX_JUMP,
            "acceleration": not tracked or max_acceleration <= MAX_ACCELERATION,
            "start": condition is None or start_distance <= MAX_START_DISTANCE}
    sizes, peaks, purities = measured
    failed = [name for name in TESTS if not held[name]]
    return Verdict(not failed, detected, found.most, displacement, cosine, max_jump, max_acceleration, positions,
                   condition is not None, start_distance, failed,
                   min(sizes, default=math.nan), max(sizes, default=math.nan), min(peaks, default=math.nan),
                   max(peaks, default=math.nan), min(purities, default=math.nan))


# summary key -> the Verdict measurement it is the median of
TRACK_MEDIANS = {"median_direction_cosine": "direction_cosine", "median_displacement_px": "displacement",
                 "median_max_jump_px": "max_jump", "median_max_acceleration_px": "max_acceleration",
                 "median_max_size_px": "max_size", "median_max_peak": "max_peak"}


def _spread(groups: dict[str, list[tuple[float, float]]]) -> float:
    """Mean over prompts of the spread (norm of the per-axis standard deviation) of a point across their seeds."""
    spreads = [torch.tensor(points).std(dim=0).norm().item() for points in groups.values() if len(points) >= 2]
    return sum(spreads) / len(spreads) if spreads else math.nan


def summarize(verdicts: list[Verdict], prompts: list[str]) -> dict:
    """Pass rate (with its Wilson 95% interval), how often each test failed (failed_<test>_rate; a video can fail
    several), detection rates, diversity and the medians of the judge's track and object measurements; in the first-frame variant also the share of videos that start where their condition does
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
               **{f"failed_{name}_rate": sum(name in v.failed for v in verdicts) / n for name in TESTS
                  if name != "start" or any(v.conditioned for v in verdicts)},
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
