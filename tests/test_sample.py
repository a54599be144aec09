"""runners/sample.py: latents equal the sampler's for the seed's noise, LoRA files sample like the merged export,
mp4s of the asked size, synthetic samples the judge reads, and bad input named. Tiny random DiT and encoders."""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import randomized_dit, save_tiny_encoders
from engine.model.encoders import VAE, TextEncoder
from engine.model.flow import sample
from engine.model.lora import ORIGINAL_FILE, LoRAConfig, add_lora, merged_state, save_lora_export
from engine.model.sampling import WAN_NEGATIVE_PROMPT
from engine.model.weights import load_dit, save_dit, save_dit_state
from engine.synthetic.scene import PROMPTS, SHAPE, encode_prompt

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a the red blue dog cat runs jumps on in beach forest city ball car".split()
SIZE = ["--frames", "5", "--height", "32", "--width", "48"]  # latents [16, 2, 4, 6]
SYNTHETIC = ["--synthetic", *SIZE, "--steps", "3"]

spec = importlib.util.spec_from_file_location("sample_runner", ROOT / "runners" / "sample.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine a second one makes each op wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    save_dit(randomized_dit("tiny"), root / "model")
    save_tiny_encoders(root / "encoders", WORDS)
    return root


def read_outputs(out: Path) -> list[tuple[dict, torch.Tensor, dict]]:
    """(index record, latents, safetensors metadata) per video, in index order."""
    outputs = []
    for line in (out / "index.jsonl").read_text().splitlines():
        record = json.loads(line)
        with safe_open(out / record["latents"], framework="pt") as f:
            outputs.append((record, f.get_tensor("latents"), f.metadata()))
    return outputs


def test_latents_are_the_samplers_for_each_seeds_noise(assets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red dog runs on the beach", "seed": 7}\n\n{"prompt": "the cat"}\n')
    common = ["--model", str(assets / "model"), "--text-encoder", str(assets / "encoders/text_encoder"),
              "--prompts", str(prompts), "--seeds", "3", "4", "--steps", "3", "--guidance", "4", *SIZE]
    assert runner.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert runner.main([*common, "--batch-size", "3", "--out", str(tmp_path / "three")]) == 0

    outputs = read_outputs(tmp_path / "one")
    assert [(r["prompt"], r["seed"]) for r, _, _ in outputs] == [("a red dog runs on the beach", 7), ("the cat", 3),
                                                                  ("the cat", 4)]
    record, _, metadata = outputs[0]
    assert metadata["prompt"] == "a red dog runs on the beach" and metadata["seed"] == "7"
    assert metadata["model"] == str((assets / "model").resolve()) and json.loads(metadata["guidance"]) == 4.0
    assert record["negative_prompt"] == WAN_NEGATIVE_PROMPT and record["latent_shape"] == [2, 4, 6]

    # Direct use of the sampler: the seed's noise on a CPU generator, umT5 embeddings, Wan's negative prompt.
    model = load_dit(assets / "model").eval()  # loaded as the runner loads it: the same numerics
    text = TextEncoder(assets / "encoders/text_encoder", assets / "encoders/tokenizer")
    negative = text.encode([WAN_NEGATIVE_PROMPT])[0][None]
    for (record, latents, _), (_, batched, _) in zip(outputs, read_outputs(tmp_path / "three")):
        noise = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(record["seed"]))
        expected = sample(model, noise, text.encode([record["prompt"]])[0][None], steps=3, solver="unipc", shift=5.0,
                          guidance_scale=4.0, negative_context=negative)[0]
        assert torch.equal(latents, expected)
        # Batched with a shorter prompt (zero-padded): the same videos up to summation order.
        torch.testing.assert_close(batched, latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[1][1], outputs[2][1], atol=1e-2)  # seeds 3 and 4 of one prompt


def test_lora_files_sample_like_the_merged_export(assets, tmp_path):
    base = randomized_dit("tiny")
    config = LoRAConfig(rank=4, alpha=8, targets=["self_attn.q", "cross_attn.v", "ffn.2"])
    adapted = add_lora(copy.deepcopy(base), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.2)
    save_lora_export(adapted.state_dict(), base.config, config, tmp_path / "merged", tmp_path / "lora")
    common = [*SYNTHETIC, "--prompt", PROMPTS[0], "--seeds", "0", "1"]

    def latents(*args: str) -> list[torch.Tensor]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert runner.main([*common, *args, "--out", str(out)]) == 0
        return [video for _, video, _ in read_outputs(out)]

    merged = latents("--model", str(tmp_path / "merged"))
    plain = latents("--model", str(assets / "model"))
    assert not torch.allclose(merged[0], plain[0], atol=1e-3)  # the adapters change the videos
    for lora in (tmp_path / "lora", tmp_path / "lora" / ORIGINAL_FILE):  # diffusers' layout, the original layout
        for video, expected in zip(latents("--model", str(assets / "model"), "--lora", str(lora)), merged):
            torch.testing.assert_close(video, expected, atol=1e-6, rtol=1e-6)

    # --lora-scale 0.5 is the merge at half of alpha / rank.
    save_dit_state(merged_state(adapted.state_dict(), LoRAConfig(rank=4, alpha=4, targets=config.targets)),
                   base.config, tmp_path / "half")
    scaled = latents("--model", str(assets / "model"), "--lora", str(tmp_path / "lora"), "--lora-scale", "0.5")
    for video, expected in zip(scaled, latents("--model", str(tmp_path / "half"))):
        torch.testing.assert_close(video, expected, atol=1e-6, rtol=1e-6)


def test_vae_writes_mp4s_of_the_asked_size(assets, tmp_path):
    out = tmp_path / "out"
    assert runner.main(["--model", str(assets / "model"), "--text-encoder", str(assets / "encoders/text_encoder"),
                        "--vae", str(assets / "encoders/vae"), "--prompt", "a dog", "--frames", "9", "--height", "32",
                        "--width", "48", "--steps", "2", "--out", str(out)]) == 0
    [(record, latents, _)] = read_outputs(out)
    assert record["video"] == "00000.mp4"
    with av.open(str(out / record["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    # The video shows the decoded latents, in order (H.264 is lossy: correlation, not equality; 0.5 when reversed).
    decoded = VAE.from_pretrained(assets / "encoders/vae").decode(latents).clamp(-1, 1)  # [3, 9, 32, 48]
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.corrcoef(torch.stack([pixels.flatten(), decoded.flatten()]))[0, 1] > 0.9


def test_synthetic_samples_are_judged(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n{PROMPTS[17]}\n")
    out = tmp_path / "out"
    assert runner.main(["--synthetic", "--model", str(assets / "model"), "--prompts", str(prompts), "--seeds", "0",
                        "1", "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    outputs = read_outputs(out)
    assert [r["prompt"] for r, _, _ in outputs] == [PROMPTS[0]] * 2 + [PROMPTS[17]] * 2
    assert all(latents.shape == (16, *SHAPE) for _, latents, _ in outputs)  # the benchmark's latent shape
    with safe_open(out / "00002.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("context"), encode_prompt(PROMPTS[17]))
    done = subprocess.run([sys.executable, "runners/synthetic.py", "judge", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 4


def assert_one_line_error(argv: list[str], message: str, capsys) -> None:
    """The runner exits with status 2 and one line, `error: ...`, that matches `message`."""
    with pytest.raises(SystemExit) as exit_:
        runner.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing"], r"--model \S*missing: no such file or folder"),
    (["--prompt", "a purple ball moving left in the forest"],
     r"--prompt: prompt 'a purple ball moving left in the forest': unknown word\(s\) purple; the vocabulary is"),
    (["--prompts", "{tmp}/prompts.txt"], r"prompts\.txt line 3: prompt 'a red ball moving sideways in the city': "
                                         r"unknown word\(s\) sideways"),
    (["--prompts", "{tmp}/prompts.jsonl"], r"prompts\.jsonl line 2: .*expected an object with a string \"prompt\""),
    (["--frames", "8"], r"video size: frames=8: expected 4n \+ 1 frames"),
    (["--height", "40"], r"video size: height=40: expected a positive multiple of 16"),
    (["--steps", "0"], r"--steps 0: expected at least 1"),
    (["--lora", "{model}/diffusion_pytorch_model.safetensors"],
     r"--lora \S+: \S+ key \S+ is in neither LoRA layout"),
    (["--out", "{model}"], r"--out \S+: expected a new or empty folder"),
    (["--text-encoder", "{model}"], r"expected either --text-encoder PATH .* or --synthetic .*, not both"),
])
def test_bad_input_is_named(assets, tmp_path, capsys, args, message):
    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\na red ball moving sideways in the city\n")
    (tmp_path / "prompts.jsonl").write_text(f'{{"prompt": "{PROMPTS[0]}"}}\n{{"prompt": "x", "seeds": [1]}}\n')
    args = [a.format(tmp=tmp_path, model=assets / "model") for a in args]
    defaults = {"--model": str(assets / "model"), "--out": str(tmp_path / "out")}
    if not {"--prompts", "--prompt"} & set(args):
        defaults["--prompt"] = PROMPTS[0]
    argv = [*SYNTHETIC, *args, *(x for k, v in defaults.items() if k not in args for x in (k, v))]
    assert_one_line_error(argv, message, capsys)


def test_command_line_exit_status_and_help(assets, tmp_path):
    done = subprocess.run([sys.executable, "runners/sample.py", "--synthetic", "--model", str(tmp_path / "none"),
                           "--prompt", PROMPTS[0], "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().endswith("none: no such file or folder"), done.stderr
    help_text = subprocess.run([sys.executable, "runners/sample.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--lora-scale", "--prompts", "--seeds", "--negative-prompt", "--synthetic", "--vae", "index.jsonl"):
        assert flag in help_text


# -- image-to-video ---------------------------------------------------------------------------------------------


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_assets(assets) -> Path:
    save_dit(randomized_dit("tiny-i2v"), assets / "i2v-model")
    write_image(assets / "landscape.png", 90, 60, seed=0)
    write_image(assets / "portrait.png", 60, 90, seed=1)
    write_image(assets / "other.png", 90, 60, seed=2)
    return assets


def i2v_args(assets: Path, prompts: Path, out: Path) -> list[str]:
    return ["--model", str(assets / "i2v-model"), "--text-encoder", str(assets / "encoders/text_encoder"),
            "--vae", str(assets / "encoders/vae"), "--prompts", str(prompts), *SIZE, "--steps", "2", "--out",
            str(out)]


def diffusers_conditions(assets: Path, image: Path, width: int, height: int) -> dict[str, torch.Tensor]:
    """What diffusers' WanImageToVideoPipeline builds from the same pixels: the first-frame condition
    (prepare_latents) and the CLIP features (encode_image)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from engine.data.video import read_image

    frame = read_image(image, lambda w, h: (width, height))  # the runner's reading of the image, [-1, 1]
    vae = AutoencoderKLWan.from_pretrained(assets / "encoders/vae").eval()
    pipe = SimpleNamespace(vae=vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           config=SimpleNamespace(expand_timesteps=False),
                           image_processor=CLIPImageProcessor.from_pretrained(assets / "encoders/image_processor"),
                           image_encoder=CLIPVisionModel.from_pretrained(assets / "encoders/image_encoder").eval())
    with torch.no_grad():
        _, condition = WanImageToVideoPipeline.prepare_latents(pipe, frame[None], 1, 16, height, width, 5,
                                                               torch.float32, torch.device("cpu"))
        pil = Image.fromarray(((frame + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
        clip_fea = WanImageToVideoPipeline.encode_image(pipe, pil, torch.device("cpu"))
    return {"y": condition[0], "clip_fea": clip_fea[0]}


def test_i2v_videos_take_each_images_aspect_and_wans_conditions(i2v_assets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red dog runs", "seed": 1, "image": str(i2v_assets / "landscape.png")})
                       + "\n" + json.dumps({"prompt": "the cat", "seed": 2, "image": str(i2v_assets / "portrait.png")})
                       + "\n")
    assert runner.main(i2v_args(i2v_assets, prompts, tmp_path / "out")) == 0
    index = [json.loads(line) for line in (tmp_path / "out/index.jsonl").read_text().splitlines()]
    # about 48 x 32 pixels at each image's aspect ratio: a landscape and a portrait video
    assert [(r["width"], r["height"], r["latent_shape"]) for r in index] == [(48, 32, [2, 4, 6]), (32, 48, [2, 6, 4])]
    for record, name in zip(index, ("landscape", "portrait")):
        with av.open(str(tmp_path / "out" / record["video"])) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height) == (record["width"], record["height"])
        with safe_open(tmp_path / "out" / record["latents"], framework="pt") as f:
            saved = {key: f.get_tensor(key) for key in ("latents", "y", "clip_fea")}
        assert record["image"] == str((i2v_assets / f"{name}.png").resolve())
        expected = diffusers_conditions(i2v_assets, i2v_assets / f"{name}.png", record["width"], record["height"])
        torch.testing.assert_close(saved["y"], expected["y"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved["clip_fea"], expected["clip_fea"], atol=1e-5, rtol=1e-5)

    # the image conditions the video: another image, same prompt and seed, another video
    prompts.write_text(json.dumps({"prompt": "a red dog runs", "seed": 1, "image": str(i2v_assets / "other.png")}))
    assert runner.main(i2v_args(i2v_assets, prompts, tmp_path / "other")) == 0
    with safe_open(tmp_path / "out/00000.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "other/00000.safetensors", framework="pt") as b:
        assert not torch.allclose(a.get_tensor("latents"), b.get_tensor("latents"), atol=1e-3)


@pytest.mark.parametrize("record, extra, message", [
    ({"prompt": "the cat", "image": "{tmp}/missing.png"}, [], r"line 1: \S*missing.png: no such file"),
    ({"prompt": "the cat", "image": "{tmp}/text.png"}, [], r"line 1: \S*text.png: not a readable image"),
    ({"prompt": "the cat"}, [], r"line 1: --model \S+ is an i2v model: each prompt needs an image"),
    ({"prompt": "the cat", "image": "{assets}/landscape.png"}, ["--height", "40"],
     r"video size: height=40: expected a positive multiple of 16"),
    ({"prompt": "the cat", "image": "{assets}/landscape.png"}, ["--model", "{assets}/model"],
     r"--model \S+: a t2v model takes no image"),
])
def test_bad_i2v_input_is_named(i2v_assets, tmp_path, capsys, record, extra, message):
    (tmp_path / "text.png").write_text("not an image")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({k: v.format(tmp=tmp_path, assets=i2v_assets) for k, v in record.items()}) + "\n")
    argv = i2v_args(i2v_assets, prompts, tmp_path / "out") + [a.format(assets=i2v_assets) for a in extra]
    assert_one_line_error(argv, message, capsys)


def test_i2v_samples_score_with_an_i2v_reward_model(i2v_assets, tmp_path):
    from engine.model.reward import RewardModel, RewardModelConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat", "seed": 2, "image": str(i2v_assets / "portrait.png")}) + "\n")
    assert runner.main(i2v_args(i2v_assets, prompts, tmp_path / "out")) == 0
    torch.manual_seed(0)
    reward = RewardModel(RewardModelConfig(blocks=1, num_heads=2, mlp_dims=(16, 8)),
                         randomized_dit("tiny-i2v", num_layers=1)).eval()
    reward.save_pretrained(tmp_path / "pavrm")
    done = subprocess.run([sys.executable, "runners/score.py", "--reward", str(tmp_path / "pavrm"), "--folder",
                           str(tmp_path / "out"), "--out", str(tmp_path / "scores.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    with safe_open(tmp_path / "out/00000.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k)[None] for k in ("latents", "context", "clip_fea", "y")}
    with torch.no_grad():
        expected = reward(tensors["latents"], torch.zeros(1), tensors["context"], clip_fea=tensors["clip_fea"],
                          y=tensors["y"]).item()
    assert row["logit"] == pytest.approx(expected, rel=1e-5)
