"""The synthetic benchmark's judge: whether a latent video's motion is good for its prompt, decided from the latents
alone by tracking the object of the prompt's colour, and the summary of a set of verdicts (pass rate with its Wilson
interval, detection, diversity, the track's medians, first-frame adherence).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

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


# summary key -> the Verdict measurement it is the median of
TRACK_MEDIANS = {"median_direction_cosine": "direction_cosine", "median_displacement_px": "displacement",
                 "median_max_jump_px": "max_jump", "median_max_acceleration_px": "max_acceleration"}


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
