"""Video files in and out (PyAV): read a clip at a target frame rate and size, write frames to an mp4.

Reading follows what a player shows: a frame's presentation timestamp says when it appears (variable frame rates
work), the display matrix says how it is rotated, the sample aspect ratio how wide its pixels are. Other streams
(audio, subtitles) are never decoded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch

from engine.errors import VideoError

# Two timestamps closer than this are the same instant (timestamps are rationals; the targets k / fps are floats).
_TIME_EPS = 1e-6


@dataclass
class Clip:
    frames: torch.Tensor  # [3, F, H, W] RGB in [-1, 1]
    source: dict  # the file's display width/height (rotation applied), rotation (degrees ccw), average fps


class _FrameConverter:
    """Decoded frame -> uint8 [H, W, 3] at the target size: scaled (swscale) to cover it, rotated, centre-cropped."""

    def __init__(self, frame: av.VideoFrame, sample_aspect: Fraction | None,
                 size_for: Callable[[int, int], tuple[int, int]]) -> None:
        self.rotation = round(frame.rotation / 90) % 4  # counterclockwise quarter turns, as np.rot90 counts them
        pixel_width = frame.width * float(sample_aspect or 1)  # anamorphic pixels are shown wider or narrower
        display = (pixel_width, frame.height) if self.rotation % 2 == 0 else (frame.height, pixel_width)
        self.display = (round(display[0]), round(display[1]))
        self.width, self.height = size_for(*self.display)
        scale = max(self.width / display[0], self.height / display[1])
        cover = (max(self.width, math.ceil(display[0] * scale)), max(self.height, math.ceil(display[1] * scale)))
        self.scaled = cover if self.rotation % 2 == 0 else cover[::-1]  # swscale works before the rotation

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        rgb = frame.reformat(width=self.scaled[0], height=self.scaled[1], format="rgb24",
                             interpolation="BICUBIC").to_ndarray()
        rgb = np.rot90(rgb, k=self.rotation)
        top, left = (rgb.shape[0] - self.height) // 2, (rgb.shape[1] - self.width) // 2
        return rgb[top:top + self.height, left:left + self.width]


def read_clip(path: str | Path, fps: float, num_frames: int,
              size_for: Callable[[int, int], tuple[int, int]]) -> Clip:
    """The first `num_frames` frames of the video at `fps` (frame k is the one on screen at k / fps after the first),
    scaled to cover `size_for(display_width, display_height)` = (width, height) and centre-cropped to it.

    Raises VideoError naming the file and the reason for a missing, unreadable or too short video.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video ({e})") from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoError(f"{path}: no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames: list[np.ndarray] = []
        convert = start = previous = None
        shown = None  # `previous`, converted (a frame can be shown at several target times when upsampling)

        def emit_previous_until(limit: float) -> None:
            nonlocal shown
            while len(frames) < num_frames and start + len(frames) / fps + _TIME_EPS < limit:
                if shown is None:
                    shown = convert(previous)
                frames.append(shown)

        rate = float(stream.average_rate or stream.guessed_rate or fps)
        last_time = 0.0
        try:
            for frame in container.decode(stream):
                time = frame.time
                if time is None:  # no timestamp: assume the stream's nominal rate
                    time = 0.0 if previous is None else last_time + 1 / rate
                if convert is None:
                    convert = _FrameConverter(frame, stream.sample_aspect_ratio, size_for)
                    start = time
                else:
                    emit_previous_until(time)
                previous, shown, last_time = frame, None, time
                if len(frames) == num_frames:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {len(frames)} clip frames ({e})") from None
        if convert is None:
            raise VideoError(f"{path}: the video stream holds no decodable frame")
        if len(frames) < num_frames:
            # The last frame stays on screen for its duration (or one frame interval).
            end = last_time + (float(previous.duration * previous.time_base) if previous.duration else 1 / rate)
            emit_previous_until(end)
            if len(frames) < num_frames:
                declared = float(stream.duration * stream.time_base) if stream.duration else None
                what = "too short" if declared is None or end - start >= declared - 1 / rate else \
                    f"truncated or corrupt (it declares {declared:.2f} s)"
                raise VideoError(f"{path}: {what}: {end - start:.2f} s decoded give {len(frames)} frames at {fps:g} "
                                 f"fps; {num_frames} frames need more than {(num_frames - 1) / fps:.2f} s")
        source = {"width": convert.display[0], "height": convert.display[1], "rotation": convert.rotation * 90,
                  "fps": rate}
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # [3, F, H, W] uint8
    return Clip(frames=video.float() / 127.5 - 1.0, source=source)


def read_image(path: str | Path, size_for: Callable[[int, int], tuple[int, int]]) -> torch.Tensor:
    """An image file (PNG, JPEG, ...: anything FFmpeg decodes) as the first frame of a clip is read by `read_clip`:
    scaled to cover `size_for(width, height)` and centre-cropped to it; [3, H, W] RGB in [-1, 1]. Raises VideoError
    naming the file for a missing or unreadable image."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        return read_clip(path, 1.0, 1, size_for).frames[:, 0]
    except VideoError as e:
        raise VideoError(f"{path}: not a readable image ({str(e).removeprefix(f'{path}: ')})") from None


def write_mp4(path: str | Path, frames: torch.Tensor, fps: float, crf: int = 18) -> Path:
    """Write RGB frames [3, F, H, W] in [-1, 1] as an H.264 mp4 (yuv420p, so H and W must be even), through a
    temporary name and a rename."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"{path}: frames must be [3, F, H, W], got {tuple(frames.shape)}")
    _, _, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 in yuv420p needs an even width and height, got {width}x{height}")
    pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with av.open(str(staging), "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for image in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
            container.mux(stream.encode())
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(path)
    return path
