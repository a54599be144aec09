"""Video preprocessing: real mp4 files (PyAV), tiny random encoders built and saved here (diffusers VAE,
transformers umT5 / CLIP), the runner end to end, bad input, a killed run resumed on two ranks, bucketing."""

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, save_tiny_encoders
from engine.config_io import load_config
from engine.data.datasets import collate
from engine.data.format import LatentListDataset
from engine.data.order import BucketedOrder, GlobalOrder, sample_order
from engine.data.preprocess import PreprocessConfig, read_records, run
from engine.data.video import read_clip, write_mp4
from engine.errors import ConfigError, VideoError
from engine.model.dit import DiT, DiTConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM, CLIP_DIM = 32, 48  # the tiny DiT presets' text_dim and clip_dim
WORDS = "a the red blue dog cat runs jumps on in beach forest city ball car".split()
SETTINGS = ["resolution=48x32", "frames=9", "fps=16"]  # latents [16, 3, 4, 6]


def make_video(path: Path, times: list[float], size=(322, 182), rotation: int = 0, audio: bool = True,
               faststart: bool = False) -> Path:
    """An H.264 mp4 whose frame i (shown at times[i] seconds) has the colour (10 i, 255 - 10 i, 128) and a red band
    on the left, with an AAC track; `faststart` puts the index (moov) before the data."""
    time_base = Fraction(1, 1000)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"crf": "10"}
        if rotation:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000) if audio else None
        for i, t in enumerate(times):
            image = np.empty((size[1], size[0], 3), np.uint8)
            image[:] = (10 * i, 255 - 10 * i, 128)
            image[:, : size[0] // 4] = (255, 0, 0)  # a red band on the left: shows the rotation
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            for k in range(int(16000 * (times[-1] + 0.1)) // 1024):
                samples = (0.1 * np.sin(np.arange(k * 1024, (k + 1) * 1024) / 8)).astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, k * 1024
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def constant_rate(count: int, fps: float) -> list[float]:
    return [i / fps for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Tiny encoders, saved as a diffusers Wan2.1 pipeline folder would hold them


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    return save_tiny_encoders(tmp_path_factory.mktemp("encoders"), WORDS, TEXT_DIM, CLIP_DIM)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A records folder: good clips (odd size, 25 fps, audio; one rotated, one variable-rate) and bad inputs."""
    folder = tmp_path_factory.mktemp("videos")
    make_video(folder / "good.mp4", constant_rate(25, 25))
    make_video(folder / "rotated.mp4", constant_rate(25, 25), rotation=90)
    make_video(folder / "vfr.mp4", [0, 0.03, 0.2, 0.21, 0.5, 0.55, 0.8, 1.0])
    make_video(folder / "short.mp4", constant_rate(8, 25))
    data = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index at the end is lost
    data = make_video(folder / "faststart.mp4", constant_rate(25, 25), faststart=True).read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 3])  # the index is there, a third of the frames too
    (folder / "text.mp4").write_text("this is not a video\n")
    return folder


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preprocess(encoders: Path, records: Path, out: Path, *extra: str) -> int:
    config = load_config(None, [f"records={records}", f"out={out}", f"encoders={encoders}", *SETTINGS, *extra],
                         cls=PreprocessConfig)
    return run(config, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Reading videos


def test_clip_resamples_by_timestamp_and_covers_the_size(videos):
    clip = read_clip(videos / "good.mp4", fps=10, num_frames=9, size_for=lambda w, h: (64, 32))
    assert clip.frames.shape == (3, 9, 32, 64)
    assert clip.source == {"width": 322, "height": 182, "rotation": 0, "fps": 25.0}
    # Frame k at 10 fps is source frame floor(2.5 k) (25 fps); the source's green channel is 255 - 10 i.
    green = ((clip.frames[1, :, :, -8:].mean(dim=(1, 2)) + 1) * 127.5).tolist()
    expected = [255 - 10 * int(2.5 * k) for k in range(9)]
    assert max(abs(g - e) for g, e in zip(green, expected)) < 4, (green, expected)

    # Variable frame rate: the frame on screen at k / 10 s.
    clip = read_clip(videos / "vfr.mp4", fps=10, num_frames=11, size_for=lambda w, h: (64, 32))
    times = [0, 0.03, 0.2, 0.21, 0.5, 0.55, 0.8, 1.0]
    shown = [max(i for i, t in enumerate(times) if t <= k / 10 + 1e-9) for k in range(11)]
    green = ((clip.frames[1, :, :, -8:].mean(dim=(1, 2)) + 1) * 127.5).tolist()
    assert max(abs(g - (255 - 10 * i)) for g, i in zip(green, shown)) < 4, (green, shown)


def test_rotation_metadata_is_applied(videos):
    config = PreprocessConfig(records="r", out="o", encoders="e", resolution="48x32")
    clip = read_clip(videos / "rotated.mp4", fps=16, num_frames=5, size_for=config.size_for)
    # Stored 322x182 with a 90 degree counterclockwise display rotation: shown 182x322, so the portrait size.
    assert clip.source["width"] == 182 and clip.source["height"] == 322 and clip.source["rotation"] == 90
    assert clip.frames.shape == (3, 5, 48, 32)
    red = clip.frames[0, 0] - clip.frames[1, 0]  # the red band, left in the file, is at the bottom on screen
    assert red[-4:].mean() > 1.5 and red[:4].mean() < 0


@pytest.mark.parametrize("name, reason", [("missing.mp4", "no such file"), ("text.mp4", "not a readable video"),
                                          ("short.mp4", "too short"), ("truncated.mp4", "not a readable video"),
                                          ("cut.mp4", "truncated or corrupt (it declares 1.00 s)")])
def test_bad_videos_raise_with_the_file_and_reason(videos, name, reason):
    with pytest.raises(VideoError) as error:
        read_clip(videos / name, fps=16, num_frames=9, size_for=lambda w, h: (48, 32))
    assert str(videos / name) in str(error.value) and reason in str(error.value)


def test_mp4_writer_round_trip(tmp_path):
    frames = torch.zeros(3, 5, 32, 48)
    frames[0] = torch.linspace(-1, 1, 5).view(5, 1, 1)
    path = write_mp4(tmp_path / "x.mp4", frames, fps=16)
    clip = read_clip(path, fps=16, num_frames=5, size_for=lambda w, h: (48, 32))
    assert clip.source["fps"] == 16
    assert (clip.frames - frames).abs().mean() < 0.05
    assert not list(tmp_path.glob(".*"))  # no staging file left


# ---------------------------------------------------------------------------------------------------------------
# Encoders


def test_vae_matches_diffusers_and_decodes(encoders, videos):
    from diffusers import AutoencoderKLWan

    from engine.model.encoders import VAE

    clip = read_clip(videos / "good.mp4", fps=16, num_frames=9, size_for=lambda w, h: (48, 32))
    vae = VAE.from_pretrained(encoders / "vae")
    latents = vae.encode(clip.frames)
    assert latents.shape == (16, 3, 4, 6)

    reference = AutoencoderKLWan.from_pretrained(encoders / "vae").eval()
    with torch.no_grad():
        mean = reference.encode(clip.frames[None]).latent_dist.mode()[0]
    config = reference.config
    expected = (mean - torch.tensor(config.latents_mean).view(16, 1, 1, 1)) / \
        torch.tensor(config.latents_std).view(16, 1, 1, 1)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    assert vae.decode(latents).shape == (3, 9, 32, 48)



def test_vae_loads_an_original_single_file_strictly(encoders, tmp_path):
    """Wan2.1_VAE.pth: a plain state dict in Wan's names, converted by diffusers; Wan2.1's architecture is the
    default one. Here a random full-size VAE, its outer layers under Wan's names (the rest pass through)."""
    from diffusers import AutoencoderKLWan

    from engine.model.encoders import VAE

    torch.manual_seed(0)
    state = AutoencoderKLWan().state_dict()
    wan_names = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
                 "decoder.conv1": "decoder.conv_in", "encoder.head.2": "encoder.conv_out",
                 "decoder.head.2": "decoder.conv_out"}
    original = dict(state)
    for wan, diffusers in wan_names.items():
        for kind in ("weight", "bias"):
            original[f"{wan}.{kind}"] = original.pop(f"{diffusers}.{kind}")
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    loaded = VAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    torch.save({k: v for k, v in original.items() if not k.startswith("decoder.")}, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match=r"Wan2.1_VAE.pth: the checkpoint does not fit the model \(missing: decoder"):
        VAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth")


def test_text_encoder_keeps_the_real_tokens(encoders):
    from transformers import UMT5EncoderModel

    from engine.model.encoders import TextEncoder

    text = TextEncoder(encoders / "text_encoder", encoders / "tokenizer")
    short, long = text.encode(["a red   dog", "the blue cat jumps on the beach"])
    assert short.shape == (4, TEXT_DIM) and long.shape == (8, TEXT_DIM)  # words + </s>
    model = UMT5EncoderModel.from_pretrained(encoders / "text_encoder").eval()
    ids = torch.tensor([[3 + WORDS.index(w) for w in "a red dog".split()] + [1] + [0] * 508])
    with torch.no_grad():
        expected = model(ids, attention_mask=ids > 0).last_hidden_state[0, :4]
    torch.testing.assert_close(short, expected)


# ---------------------------------------------------------------------------------------------------------------
# The runner


def test_preprocess_t2v_skips_bad_videos_and_reports_them(encoders, videos, tmp_path):
    records = write_records(videos / "t2v.jsonl", [
        {"video": "good.mp4", "prompt": "a red dog runs", "motion_quality": 1, "physics_quality": 1},
        {"video": "rotated.mp4", "prompt": "a cat", "motion_quality": 0, "physics_quality": 1},
        {"video": "truncated.mp4", "prompt": "a car", "motion_quality": 1, "physics_quality": 0},
        {"video": "cut.mp4", "prompt": "a car", "motion_quality": 1, "physics_quality": 0},
        {"video": "text.mp4", "prompt": "a ball", "motion_quality": 0, "physics_quality": 0},
        {"video": "missing.mp4", "prompt": "a dog", "motion_quality": 1, "physics_quality": 1},
        {"video": "vfr.mp4", "prompt": "the city", "motion_quality": 1, "physics_quality": 1, "id": "v",
         "extra": {"source": "test"}},
    ])
    out = tmp_path / "data"
    assert preprocess(encoders, records, out) == 0
    summary = json.loads((out / "train.summary.json").read_text())
    assert (summary["done"], summary["listed"]) == (3, 3)
    assert {s["id"]: s["reason"].split(": ", 1)[1][:20] for s in summary["skipped"]} == {
        "truncated": "not a readable video", "cut": "truncated or corrupt", "text": "not a readable video",
        "missing": "no such file"}
    assert summary["failed"] == []

    dataset = LatentListDataset(out / "train.list", required_fields=("motion_quality",), latent_channels=16)
    assert [m["id"] for m in dataset.metas] == ["good", "rotated", "v"]
    assert dataset.latent_shapes == [(16, 3, 4, 6), (16, 3, 6, 4), (16, 3, 4, 6)]  # the rotated one is portrait
    sample = dataset[0]
    assert sample["context"].shape == (5, TEXT_DIM) and float(sample["motion_quality"]) == 1.0
    assert dataset.metas[2]["extra"] == {"source": "test"} and dataset.metas[2]["source"]["rotation"] == 0
    assert dataset.null_context.shape == (1, TEXT_DIM)  # the empty prompt: just </s>

    # The latents are the VAE's on the decoded clip.
    from engine.model.encoders import VAE

    clip = read_clip(videos / "good.mp4", fps=16, num_frames=9, size_for=lambda w, h: (48, 32))
    torch.testing.assert_close(sample["latents"], VAE.from_pretrained(encoders / "vae").encode(clip.frames))

    # A label the task needs but a meta lacks: the error names the meta file and the field.
    meta = out / "meta" / "v.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "motion_quality"}))
    with pytest.raises(ValueError, match=rf"{meta}: missing field 'motion_quality'"):
        LatentListDataset(out / "train.list", required_fields=("motion_quality",))

    # Batches of one shape: bucketing puts the portrait sample into micro-batches of its own.
    order = sample_order(dataset, micro_batch=2, seed=0)
    assert isinstance(order, BucketedOrder)
    for start in range(0, 4 * order.epoch_length, 2):
        batch = [order.index(n) for n in range(start, start + 2)]
        assert len({dataset.latent_shapes[i] for i in batch}) == 1
        collate([dataset[i] for i in batch])


def test_preprocess_i2v_batch_runs_through_the_dit(encoders, videos, tmp_path):
    records = tmp_path / "i2v.json"
    records.write_text(json.dumps([
        {"video": str(videos / "good.mp4"), "prompt": "a dog", "pair_id": 1, "preferred": True, "id": "a"},
        {"video": str(videos / "vfr.mp4"), "prompt": "a blue car", "pair_id": 1, "preferred": False, "id": "b"},
        {"video": str(videos / "good.mp4"), "prompt": "a cat", "pair_id": "p", "preferred": True, "id": "c"},
        {"video": str(videos / "short.mp4"), "prompt": "a ball", "pair_id": "p", "preferred": False, "id": "d"},
    ]))
    out = tmp_path / "data"
    assert preprocess(encoders, records, out, "task=i2v") == 0
    summary = json.loads((out / "train.summary.json").read_text())
    assert [s["id"] for s in summary["skipped"]] == ["d"] and "too short" in summary["skipped"][0]["reason"]
    assert summary["left_out"] == [{"id": "c", "line": 3, "reason": "pair 'p': its other video (d) was not encoded"}]

    dataset = LatentListDataset(out / "train.list", latent_channels=16, tensors=("latents", "context", "clip_fea", "y"))
    sample = dataset[0]
    assert sample["clip_fea"].shape == (257, CLIP_DIM) and sample["y"].shape == (20, 3, 4, 6)
    assert (sample["y"][:4, 0] == 1).all() and (sample["y"][:4, 1:] == 0).all()
    # The condition is the VAE encoding of the first frame followed by black frames.
    from engine.model.encoders import VAE

    vae = VAE.from_pretrained(encoders / "vae")
    clip = read_clip(videos / "good.mp4", fps=16, num_frames=9, size_for=lambda w, h: (48, 32))
    condition = torch.cat([clip.frames[:, :1], torch.zeros_like(clip.frames[:, 1:])], dim=1)
    torch.testing.assert_close(sample["y"][4:], vae.encode(condition))
    # CLIP features: the penultimate hidden states of the processed first frame.
    from transformers import CLIPImageProcessor, CLIPVisionModel

    first = ((clip.frames[:, 0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = CLIPImageProcessor.from_pretrained(encoders / "image_processor")(images=first, return_tensors="pt")
    with torch.no_grad():
        hidden = CLIPVisionModel.from_pretrained(encoders / "image_encoder")(**pixels, output_hidden_states=True)
    torch.testing.assert_close(sample["clip_fea"], hidden.hidden_states[-2][0])

    from engine.data.pairs import pairs_from_metas

    assert pairs_from_metas(dataset) == [(0, 1)]
    batch = collate([dataset[0], dataset[1]])
    model = DiT(DiTConfig.preset("tiny-i2v")).eval()
    with torch.no_grad():
        out = model(batch["latents"], torch.tensor([100.0, 900.0]), batch["context"], clip_fea=batch["clip_fea"],
                    y=batch["y"])
    assert out.shape == batch["latents"].shape and torch.isfinite(out).all()


def test_records_are_checked_before_any_work(tmp_path):
    cases = [
        ({"video": "a.mp4"}, "prompt=None: expected a string"),
        ({"video": "a.mp4", "prompt": "x", "motion_qualty": 1}, "unknown field 'motion_qualty'"),
        ({"video": "a.mp4", "prompt": "x", "motion_quality": "good"}, "motion_quality='good': expected a number"),
        ({"video": "a.mp4", "prompt": "x", "pair_id": 3}, "needs both pair_id and preferred"),
        ({"video": "a.mp4", "prompt": "x", "id": "../a"}, "id='../a'"),
    ]
    for record, message in cases:
        path = write_records(tmp_path / "r.jsonl", [{"video": "b.mp4", "prompt": "fine"}, record])
        with pytest.raises(ValueError, match=f"{path}:2: .*{message}".replace("(", r"\(").replace(")", r"\)")):
            read_records(path)
    path = write_records(tmp_path / "r.jsonl", [{"video": "x/a.mp4", "prompt": ""}, {"video": "x/a.mkv", "prompt": ""}])
    with pytest.raises(ValueError, match="id 'x__a' is also the id of line 1"):
        read_records(path)
    with pytest.raises(ConfigError, match="frames=8: expected 4n"):
        PreprocessConfig(records="r", out="o", encoders="e", frames=8)
    with pytest.raises(ConfigError, match="image_encoder is not set"):
        PreprocessConfig(records="r", out="o", vae="v", text_encoder="t", tokenizer="t", task="i2v")


def test_killed_run_resumes_on_two_ranks(encoders, videos, tmp_path):
    records = write_records(tmp_path / "records.jsonl", [
        {"video": str(videos / ("good.mp4" if i % 2 else "vfr.mp4")), "prompt": f"a dog {i}", "id": f"s{i:02d}"}
        for i in range(10)])
    out = tmp_path / "data"
    args = [f"records={records}", f"out={out}", f"encoders={encoders}", *SETTINGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen([sys.executable, "runners/preprocess.py", "--no-progress", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as first:
        deadline = time.monotonic() + 120
        while len(list((out / "meta").glob("*.json"))) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL, "the first run ended before it was killed"
    done_before = {p.stem: p.stat().st_mtime_ns for p in (out / "meta").glob("*.json")}
    assert 3 <= len(done_before) < 10 and not (out / "train.list").exists()
    for meta in (out / "meta").glob("*.json"):  # whatever has a meta is complete
        assert load_file(out / "samples" / f"{meta.stem}.safetensors")["latents"].shape == (16, 3, 4, 6)

    done = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "runners/preprocess.py", "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train.summary.json").read_text())
    assert (summary["done"], summary["done_earlier"], summary["done_this_run"]) == (10, len(done_before),
                                                                                    10 - len(done_before))
    assert f"10 of 10 records done ({10 - len(done_before)} this run, {len(done_before)} earlier)" in done.stdout
    assert all((out / "meta" / f"{i}.json").stat().st_mtime_ns == t for i, t in done_before.items())
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert len(LatentListDataset(out / "train.list")) == 10

    # Other settings into the same folder would mix two kinds of samples.
    other = subprocess.run([sys.executable, "runners/preprocess.py", *args, "fps=24"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "was written with fps=16.0 (now 24.0)" in other.stderr


# ---------------------------------------------------------------------------------------------------------------
# Sample order


def test_bucketed_order_keeps_micro_batches_of_one_shape_and_a_single_shape_keeps_the_global_order():
    shapes = [(16, 3, 4, 6)] * 5 + [(16, 3, 6, 4)] * 2 + [(16, 5, 4, 6)]
    order = BucketedOrder(shapes, micro_batch=2, seed=3)
    assert order.epoch_length == 6 + 2 + 2
    for epoch in range(3):
        numbers = range(epoch * order.epoch_length, (epoch + 1) * order.epoch_length)
        indices = [order.index(n) for n in numbers]
        assert set(indices) == set(range(8))  # every sample, once or (filling a bucket's last batch) twice
        for i in range(0, len(indices), 2):
            assert shapes[indices[i]] == shapes[indices[i + 1]]
    again = BucketedOrder(shapes, micro_batch=2, seed=3)
    assert [again.index(n) for n in reversed(range(25))] == [order.index(n) for n in reversed(range(25))]

    class Uniform(torch.utils.data.Dataset):
        latent_shapes = [(16, 3, 4, 6)] * 7

        def __len__(self):
            return 7

    uniform = sample_order(Uniform(), micro_batch=2, seed=3)
    assert isinstance(uniform, GlobalOrder)
    assert [uniform.index(n) for n in range(14)] == [GlobalOrder(7, 3).index(n) for n in range(14)]
