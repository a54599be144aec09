"""Videos -> a latent dataset: decode, resample, crop, encode with the VAE and text (and image) encoders, write
samples in the format of engine/data/format.py. Runs for hours on thousands of videos, so it shards over ranks,
resumes, skips broken input and says what it skipped.

Input: a JSON list or a JSONL file of records, one per video (paths relative to the records file):

    {"video": "clips/0001.mp4", "prompt": "a dog runs on the beach",
     "id": "0001",                                      optional; default: the video path, '/' -> '__'
     "physics_quality": 1, "human_quality": 1, "motion_quality": 0,   optional labels (numbers, 1 = qualified)
     "pair_id": "p17", "preferred": true,               optional preference pair (two records per pair_id)
     "extra": {...}}                                    optional, copied into the sample's meta

Output under `out`: samples/<id>.safetensors and meta/<id>.json per video, <split>.list, null_context.safetensors,
<split>.summary.json (what was done, skipped and failed, with reasons) and preprocess.json (the settings; a later
run into the same folder must use the same ones).

A record is done when its meta file exists: write_sample renames the tensors into place first and the meta last,
so a run killed at any point leaves no meta for a half-written sample, and a restart redoes only what is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch

from engine.atomic import atomic_write_text
from engine.data.format import LABEL_FIELDS, write_list, write_sample
from engine.data.video import read_clip
from engine.errors import ConfigError, VideoError

RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
COMPONENTS = {"t2v": ("vae", "text_encoder", "tokenizer"),
              "i2v": ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")}
RECORD_KEYS = ("video", "prompt", "id", *LABEL_FIELDS, "pair_id", "preferred", "extra")
# Settings that change what a sample holds: a resumed run must use the same ones.
SETTINGS = ("task", "resolution", "portrait", "fps", "frames", "text_len", "precision", "vae_tiling")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Ranks meet once, at the end, to merge their reports; a shard can take many hours longer than another.
GATHER_TIMEOUT = timedelta(hours=72)


def parse_resolution(resolution: str) -> tuple[int, int]:
    """(width, height) of `480p`, `720p` or `WIDTHxHEIGHT`."""
    if resolution in RESOLUTIONS:
        return RESOLUTIONS[resolution]
    match = re.fullmatch(r"(\d+)x(\d+)", resolution)
    if not match or any(int(v) % SIZE_MULTIPLE or int(v) == 0 for v in match.groups()):
        raise ConfigError(f"resolution={resolution!r}: expected 480p, 720p or WIDTHxHEIGHT with both positive "
                          f"multiples of {SIZE_MULTIPLE} (e.g. 832x480)")
    return int(match[1]), int(match[2])


@dataclass
class PreprocessConfig:
    """Turning videos into a latent dataset: inputs, encoders, clip geometry."""

    records: str | None = None  # JSON list or JSONL of records (see engine/data/preprocess.py)
    out: str | None = None  # dataset root: samples/, meta/, <split>.list, null_context.safetensors
    split: str = "train"  # name of the list file (<out>/<split>.list)
    task: Literal["t2v", "i2v"] = "t2v"  # i2v adds CLIP image features and the first-frame condition
    encoders: str | None = None  # diffusers Wan2.1 pipeline folder: vae/ text_encoder/ tokenizer/ (i2v: image_*/)
    vae: str | None = None  # instead of <encoders>/vae: an AutoencoderKLWan folder or the original Wan2.1_VAE.pth
    text_encoder: str | None = None  # instead of <encoders>/text_encoder: a transformers UMT5EncoderModel folder
    tokenizer: str | None = None  # instead of <encoders>/tokenizer
    image_encoder: str | None = None  # i2v, instead of <encoders>/image_encoder: a CLIPVisionModel folder
    image_processor: str | None = None  # i2v, instead of <encoders>/image_processor: a CLIPImageProcessor folder
    resolution: str = "480p"  # 480p (832x480), 720p (1280x720) or WIDTHxHEIGHT, both multiples of 16
    portrait: bool = True  # a video taller than wide gets the transposed size (480x832); false: always landscape
    fps: float = 16.0  # clip frame rate (Wan2.1 generates 16 fps)
    frames: int = 81  # frames per clip, 4n + 1 (81: 5 s at 16 fps); shorter videos are skipped
    text_len: int = 512  # umT5 tokens at most (Wan: 512)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # text and image encoders; auto: bf16 on GPU, else fp32
    vae_tiling: bool = False  # encode in spatial tiles: less GPU memory at 720P, slightly different latents

    def __post_init__(self) -> None:
        for name in ("records", "out"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name} is not set: e.g. records=videos.jsonl out=data/latents")
        for name in COMPONENTS[self.task]:
            if getattr(self, name) is None and self.encoders is None:
                raise ConfigError(f"{name} is not set: give encoders=<diffusers Wan2.1 folder> or {name}=<path>")
        parse_resolution(self.resolution)
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ConfigError(f"frames={self.frames}: expected 4n + 1 (e.g. 33, 49, 81)")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps={self.fps}: expected a positive number")
        if not 1 <= self.text_len <= 512:
            raise ConfigError(f"text_len={self.text_len}: expected 1 to 512 (the DiT's text length)")
        if not ID_PATTERN.fullmatch(self.split):
            raise ConfigError(f"split={self.split!r}: expected a file name (letters, digits, '.', '_', '-')")

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """The clip size (width, height) for a video shown at width x height."""
        w, h = parse_resolution(self.resolution)
        return (min(w, h), max(w, h)) if self.portrait and height > width else (w, h)

    def path(self, component: str) -> Path:
        explicit = getattr(self, component)
        return Path(explicit) if explicit is not None else Path(self.encoders) / component


@dataclass
class Record:
    """One input video."""

    line: int  # 1-based position in the records file (JSON list: the item's position)
    id: str
    video: Path
    prompt: str
    meta: dict = field(default_factory=dict)  # labels, pair_id, preferred, extra: copied into the sample's meta


def _record(item, line: int, where: str, base: Path) -> Record:
    at = f"{where}:{line}"
    if not isinstance(item, dict):
        raise ValueError(f"{at}: expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"{at}: unknown field {unknown[0]!r} (fields: {', '.join(RECORD_KEYS)}; put anything "
                         "else under 'extra')")
    for key in ("video", "prompt"):
        if not isinstance(item.get(key), str) or (key == "video" and not item[key]):
            raise ValueError(f"{at}: {key}={item.get(key)!r}: expected a {'non-empty ' if key == 'video' else ''}"
                             "string")
    sample_id = item.get("id", re.sub(r"[^A-Za-z0-9._-]", "_", str(Path(item["video"]).with_suffix("")).replace(
        "/", "__")).lstrip("._-"))
    if not isinstance(sample_id, str) or not ID_PATTERN.fullmatch(sample_id):
        raise ValueError(f"{at}: id={sample_id!r}: expected letters, digits, '.', '_' or '-' (a file name)")
    meta = {}
    for key in LABEL_FIELDS:
        if key in item:
            value = item[key]
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{at}: {key}={value!r}: expected a number (1 = qualified, 0 = not)")
            meta[key] = value
    if ("pair_id" in item) != ("preferred" in item):
        raise ValueError(f"{at}: a preference pair needs both pair_id and preferred (has only "
                         f"{'pair_id' if 'pair_id' in item else 'preferred'})")
    if "pair_id" in item:
        if not isinstance(item["pair_id"], (str, int)) or isinstance(item["pair_id"], bool):
            raise ValueError(f"{at}: pair_id={item['pair_id']!r}: expected a string or an integer")
        if not isinstance(item["preferred"], bool):
            raise ValueError(f"{at}: preferred={item['preferred']!r}: expected true or false")
        meta.update(pair_id=item["pair_id"], preferred=item["preferred"])
    if "extra" in item:
        if not isinstance(item["extra"], dict):
            raise ValueError(f"{at}: extra={item['extra']!r}: expected a JSON object")
        meta["extra"] = item["extra"]
    video = Path(item["video"])
    return Record(line=line, id=sample_id, video=video if video.is_absolute() else base / video,
                  prompt=item["prompt"], meta=meta)


def read_records(path: str | Path) -> list[Record]:
    """Parse and check a records file (.json: a list; otherwise JSONL, one object per line, blank lines ignored).
    Errors name the file, the line and the field: ids must be unique, pairs must have one preferred and one
    rejected video."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
        numbered = list(enumerate(items, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
    records = [_record(item, number, str(path), path.parent) for number, item in numbered]
    if not records:
        raise ValueError(f"{path}: no records")
    seen: dict[str, Record] = {}
    pairs: dict[str, list[Record]] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(f"{path}:{record.line}: id {record.id!r} is also the id of line {seen[record.id].line}"
                             " (ids name the output files; give each record its own 'id')")
        seen[record.id] = record
        if "pair_id" in record.meta:
            pairs.setdefault(str(record.meta["pair_id"]), []).append(record)  # as pairs_from_metas groups them
    for pair_id, members in pairs.items():
        if len(members) != 2 or sum(m.meta["preferred"] for m in members) != 1:
            lines = ", ".join(str(m.line) for m in members)
            raise ValueError(f"{path}: pair_id {pair_id!r} (lines {lines}) needs exactly two videos, one with "
                             "preferred=true and one with preferred=false")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Encoding


class Encoders:
    """The models a task needs, on one device. The VAE runs in fp32, as in Wan."""

    def __init__(self, config: PreprocessConfig, device: torch.device, need_vae: bool = True) -> None:
        from engine.model.encoders import VAE, ImageEncoder, TextEncoder

        dtype = torch.bfloat16 if config.precision == "bf16" or (
            config.precision == "auto" and device.type == "cuda") else torch.float32
        self.config = config
        self.text = TextEncoder(config.path("text_encoder"), config.path("tokenizer"), device, dtype,
                                max_length=config.text_len)
        self.vae = VAE.from_pretrained(config.path("vae"), device, tiling=config.vae_tiling) if need_vae else None
        self.image = ImageEncoder(config.path("image_encoder"), config.path("image_processor"), device, dtype) \
            if need_vae and config.task == "i2v" else None

    def sample(self, record: Record) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) of one record; VideoError for a video that cannot give the clip."""
        config = self.config
        clip = read_clip(record.video, config.fps, config.frames, config.size_for)
        tensors = {"latents": self.vae.encode(clip.frames), "context": self.text.encode([record.prompt])[0]}
        if config.task == "i2v":
            from engine.model.encoders import image_conditions

            tensors.update(image_conditions(clip.frames, self.image, self.vae))
        height, width = clip.frames.shape[2:]
        meta = {"prompt": record.prompt, **record.meta, "video": str(record.video), "fps": config.fps,
                "frames": config.frames, "size": [width, height], "source": clip.source}
        return tensors, meta


def is_done(root: Path, sample_id: str) -> bool:
    """The sample's meta (renamed into place after its tensors) and tensors are both there."""
    return (root / "meta" / f"{sample_id}.json").is_file() and (root / "samples" / f"{sample_id}.safetensors").is_file()


def _remove_staging(root: Path, sample_id: str) -> None:
    """Staging files a killed run left for this sample (only the rank that owns a sample writes it)."""
    for pattern in (f"samples/.{sample_id}.safetensors.tmp-*", f"meta/.{sample_id}.json.tmp-*"):
        for stale in root.glob(pattern):
            stale.unlink(missing_ok=True)


def _check_settings(root: Path, config: PreprocessConfig) -> None:
    """The folder's settings file, written by the first run; a later run with other settings is an error."""
    settings = {name: getattr(config, name) for name in SETTINGS}
    path = root / "preprocess.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}={before.get(k)!r} (now {v!r})" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise ConfigError(f"{path}: {root} was written with {', '.join(changed)}; samples of both would mix "
                              "in one dataset: use another `out`, or the same settings")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1))


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def process(encoders: Encoders, todo: list[Record], progress: bool = True) -> list[dict]:
    """Encode and write records; returns one report per record: {"id", "line", "video", "status": done |
    skipped | failed, "reason"}. Skipped: the input's fault (missing, unreadable, too short video); failed:
    anything else (out of memory, an encoder error), with its traceback on stderr."""
    from tqdm import tqdm

    root = Path(encoders.config.out)
    for record in todo:
        _remove_staging(root, record.id)
    reports = []
    for record in tqdm(todo, desc="preprocess", unit="video", disable=not progress, dynamic_ncols=True):
        report = {"id": record.id, "line": record.line, "video": str(record.video)}
        try:
            tensors, meta = encoders.sample(record)
            write_sample(root, record.id, tensors, meta)
            report["status"] = "done"
        except VideoError as e:
            report.update(status="skipped", reason=str(e))
            _log(f"skipped {record.id} (line {record.line}): {e}")
        except Exception as e:  # noqa: BLE001 (one bad sample must not end hours of work; it is reported)
            report.update(status="failed", reason=f"{type(e).__name__}: {e}")
            _log(f"failed {record.id} (line {record.line}, {record.video}):\n{traceback.format_exc()}")
        reports.append(report)
    return reports


def finish(config: PreprocessConfig, records: list[Record], reports: list[dict], null_context: torch.Tensor
           ) -> dict:
    """Write the list (every done record whose pair, if any, is complete and of one latent shape), the null
    prompt's embedding and the summary file; returns the summary."""
    root = Path(config.out)
    done = {r.id for r in records if is_done(root, r.id)}
    shapes = {i: json.loads((root / "meta" / f"{i}.json").read_text())["latent_shape"] for i in done}
    left_out = []
    pairs: dict[str, list[Record]] = {}
    for record in records:
        if "pair_id" in record.meta:
            pairs.setdefault(str(record.meta["pair_id"]), []).append(record)
    for pair_id, members in pairs.items():
        missing = [m for m in members if m.id not in done]
        if missing:
            reason = f"pair {pair_id!r}: its other video ({missing[0].id}) was not encoded"
        elif shapes[members[0].id] != shapes[members[1].id]:
            reason = (f"pair {pair_id!r}: latent shapes differ ({shapes[members[0].id]} vs "
                      f"{shapes[members[1].id]}); a pair shares its noise, so both need one shape")
        else:
            continue
        left_out += [{"id": m.id, "line": m.line, "reason": reason} for m in members if m.id in done]
    excluded = {entry["id"] for entry in left_out}
    listed = [root / "meta" / f"{r.id}.json" for r in records if r.id in done and r.id not in excluded]
    by_status = {status: [r for r in reports if r["status"] == status] for status in ("done", "skipped", "failed")}
    summary = {
        "records": len(records), "done": len(done), "done_this_run": len(by_status["done"]),
        "done_earlier": len(done) - len(by_status["done"]), "skipped": by_status["skipped"],
        "failed": by_status["failed"], "left_out": left_out, "listed": len(listed),
        "list": str(root / f"{config.split}.list") if listed else None,
    }
    for stale in root.glob(".*.tmp-*"):  # a killed run's list, embedding or summary (rank 0 writes them alone)
        stale.unlink(missing_ok=True)
    if listed:
        write_list(root, config.split, listed, null_context)
    atomic_write_text(root / f"{config.split}.summary.json", json.dumps(summary, indent=1))
    return summary


def summary_line(summary: dict, root: Path, split: str) -> str:
    line = (f"preprocess: {summary['done']} of {summary['records']} records done ({summary['done_this_run']} this "
            f"run, {summary['done_earlier']} earlier), {len(summary['skipped'])} skipped, "
            f"{len(summary['failed'])} failed")
    if summary["left_out"]:
        line += f", {len(summary['left_out'])} left out of the list (incomplete pairs)"
    target = summary["list"] or "no list written (no sample done)"
    return f"{line} -> {target}; details in {root / f'{split}.summary.json'}"


def run(config: PreprocessConfig, progress: bool = True) -> int:
    """Preprocess on this rank (RANK / WORLD_SIZE / LOCAL_RANK from torchrun or the deepspeed launcher; a world
    of one without them). Rank r takes records r, r + W, r + 2W, ...; rank 0 writes the list and the summary once
    every rank is through. Returns the exit status: 0, or 1 when a record failed or no sample is done."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    records = read_records(config.records)
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    _check_settings(root, config)
    if world > 1:
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        mine = records[rank::world]
        todo = [r for r in mine if not is_done(root, r.id)]
        if rank == 0:
            _log(f"preprocess: {len(records)} records on {world} rank(s); rank 0 has {len(mine)}, "
                 f"{len(mine) - len(todo)} of them done earlier")
        # Rank 0 always needs the text encoder: the empty prompt's embedding goes beside the list.
        encoders = Encoders(config, device, need_vae=bool(todo)) if todo or rank == 0 else None
        reports = process(encoders, todo, progress=progress and rank == 0) if todo else []
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, reports)
            reports = [report for part in gathered for report in part]
        status = 0
        try:
            if rank == 0:
                summary = finish(config, records, reports, encoders.text.encode([""])[0])
                print(summary_line(summary, root, config.split), flush=True)
                status = 1 if summary["failed"] or not summary["listed"] else 0
        finally:
            if world > 1:
                # Every rank tears the group down at the same point, also when rank 0 failed: a rank that leaves
                # while another still uses the group can abort in gloo ("terminate called without an active
                # exception"), and one left waiting would wait out GATHER_TIMEOUT.
                dist.barrier()
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

