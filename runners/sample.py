r"""Generate videos from a trained generator: prompts and seeds in; latents, mp4s (with a VAE) and an index out.

    python runners/sample.py --model /ckpt/Wan2.1-T2V-1.3B --text-encoder /ckpt/Wan2.1-T2V-1.3B-Diffusers/text_encoder \
        --vae /ckpt/Wan2.1-T2V-1.3B-Diffusers/vae --prompt "a dog runs along the beach" --seeds 0 1 2 --out samples/dog
    python runners/sample.py --model runs/prfl/checkpoints/step_000500/model --text-encoder ... \
        --prompts prompts.jsonl --out samples/prfl
    python runners/sample.py --model /ckpt/Wan2.1-T2V-1.3B --lora runs/lora/checkpoints/step_000500/lora ...
    python runners/sample.py --synthetic --model runs/synthetic-base/checkpoints/step_N/model --prompts prompts.txt \
        --seeds 0 1 --out samples/base && python runners/synthetic.py judge samples/base
    python runners/sample.py --model /ckpt/Wan2.1-I2V-14B-480P --text-encoder /ckpt/Wan2.1-I2V-14B-480P-Diffusers/text_encoder \
        --vae /ckpt/Wan2.1-I2V-14B-480P-Diffusers/vae --prompts i2v.jsonl --out samples/i2v     # image-to-video

Every prompt is sampled once per seed (a JSONL record's own `seed` replaces the list). The folder `--out` (new or
empty) receives, per video, NNNNN.safetensors (`latents` [16, f, h, w] and `context`, the prompt's text embedding;
its metadata holds the prompt, seed and every sampling setting), NNNNN.mp4 with --vae, and index.jsonl listing what
was written; each file appears whole (written under a temporary name, then renamed), the index after each batch.
A video's noise depends on its seed only (not on the batch or the device), so the same seed gives the same video.

Image-to-video (an i2v --model): every prompt comes with an image, a JSONL record's `"image": PATH` (relative to the
prompts file) or --image. The image is read as runners/preprocess.py reads a video's first frame, at Wan's size for
its aspect ratio (about --width x --height pixels: a portrait image gives a portrait video), and gives the CLIP
features (--image-encoder) and the VAE's first-frame condition as preprocessing builds them; both are saved with the
latents (`clip_fea`, `y`), so runners/score.py can score the video with an i2v reward model.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from engine.model.weights import load_dit

INDEX = "index.jsonl"


class InputError(Exception):
    """Bad input; the message names the argument or file, the value and what was expected."""


@contextlib.contextmanager
def blame(what: str):
    """Report an engine error about an input (a ValueError, or a file that cannot be read) as that input's error."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise InputError(f"{what}: {e}".replace("\n", " ")) from None


def read_prompts(path: Path) -> list[tuple[str, int | None, Path | None, str]]:
    """(prompt, own seed or None, own image or None, where) per record: one prompt per line, or for a .jsonl file one
    JSON object per line with a string `prompt`, an optional integer `seed` and an optional `image` path (relative to
    the file). Blank lines are skipped."""
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path} line {number}"
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append((line.strip(), None, None, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        valid = isinstance(record, dict) and isinstance(record.get("prompt"), str) and \
            not set(record) - {"prompt", "seed", "image"} and type(record.get("seed", 0)) is int and \
            isinstance(record.get("image", ""), str)
        if not valid:
            raise InputError(f"{where}: {line.strip()[:80]}: expected an object with a string \"prompt\", an "
                             "optional integer \"seed\" and an optional \"image\" path, nothing else")
        image = path.parent / record["image"] if "image" in record else None
        records.append((record["prompt"], record.get("seed"), image, where))
    if not records:
        raise InputError(f"--prompts {path}: the file holds no prompt")
    return records


def sampling_defaults(synthetic: bool) -> dict:
    """Wan models: the trainer's sampling chain (engine.config.SamplingConfig) and diffusers' WanPipeline size
    (81 frames at 832x480). --synthetic: the benchmark's latent shape and `runners/synthetic.py sample`'s chain."""
    from engine.config import SamplingConfig
    from engine.model.sampling import WAN_NEGATIVE_PROMPT, video_size
    from engine.synthetic.scene import SHAPE

    if synthetic:
        frames, height, width = video_size(SHAPE)
        return dict(steps=20, solver="unipc", shift=3.0, guidance=1.0, negative_prompt="", frames=frames,
                    height=height, width=width)
    chain = SamplingConfig()
    return dict(steps=chain.steps, solver=chain.solver, shift=chain.shift, guidance=chain.guidance_scale,
                negative_prompt=WAN_NEGATIVE_PROMPT, frames=81, height=480, width=832)


def check_settings(args) -> None:
    if args.synthetic == (args.text_encoder is not None):
        raise InputError("expected either --text-encoder PATH (umT5, for Wan models) or --synthetic (the synthetic "
                         "benchmark's toy encoder)" + (", not both" if args.synthetic else ""))
    for flag, path in (("--model", args.model), ("--lora", args.lora), ("--text-encoder", args.text_encoder),
                       ("--tokenizer", args.tokenizer), ("--vae", args.vae), ("--image", args.image),
                       ("--image-encoder", args.image_encoder), ("--image-processor", args.image_processor)):
        if path is not None and not path.exists():
            raise InputError(f"{flag} {path}: no such file or folder")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"--out {args.out}: expected a new or empty folder (it already holds files)")
    for flag, value, ok, expected in (("--steps", args.steps, args.steps >= 1, "at least 1"),
                                      ("--shift", args.shift, args.shift > 0, "a positive number"),
                                      ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
                                      ("--fps", args.fps, args.fps > 0, "a positive number")):
        if not ok:
            raise InputError(f"{flag} {value}: expected {expected}")
    if args.lora is None and args.lora_scale != 1.0:
        raise InputError(f"--lora-scale {args.lora_scale} needs --lora")


def text_encoder(args, device: torch.device, dtype: torch.dtype):
    """(prompt -> context [L, text_dim] fp32 on the CPU, its width): umT5, or the synthetic benchmark's toy encoder
    (the empty prompt is its null embedding, as in training)."""
    if args.synthetic:
        from engine.synthetic.scene import TEXT_DIM, encode_prompt, null_prompt_embedding

        return (lambda prompt: encode_prompt(prompt) if prompt else null_prompt_embedding()), TEXT_DIM
    from engine.model.encoders import TextEncoder

    # A diffusers pipeline folder keeps the tokenizer beside the text encoder, in tokenizer/.
    tokenizer = args.tokenizer or (args.text_encoder if (args.text_encoder / "tokenizer_config.json").is_file()
                                   else args.text_encoder.parent / "tokenizer")
    with blame(f"--text-encoder {args.text_encoder} (tokenizer {tokenizer})"):
        encoder = TextEncoder(args.text_encoder, tokenizer, device, dtype)
    return (lambda prompt: encoder.encode([prompt])[0]), encoder.dim


def image_encoder(args, device: torch.device, dtype: torch.dtype):
    """CLIP ViT-H/14 for i2v: --image-encoder / --image-processor, or the image_encoder/ and image_processor/ folders
    beside --text-encoder (a diffusers Wan2.1 I2V pipeline folder)."""
    from engine.model.encoders import ImageEncoder

    model = args.image_encoder or args.text_encoder.parent / "image_encoder"
    processor = args.image_processor or args.text_encoder.parent / "image_processor"
    with blame(f"--image-encoder {model} (image processor {processor})"):
        return ImageEncoder(model, processor, device, dtype)


def read_images(args, records, patch: tuple[int, int, int], stride: tuple[int, int, int]) -> dict:
    """{image path: (latent shape, frame [3, H, W])} of every prompt's image, read and sized as Wan sizes i2v
    (before any model loads, so that a bad image stops the run at once)."""
    from engine.data.video import read_image
    from engine.model.sampling import i2v_size, latent_shape

    images = {}
    for _, _, image, where in records:
        if image in images:
            continue
        size = {}

        def size_for(width: int, height: int) -> tuple[int, int]:
            size["wh"] = i2v_size(width, height, args.width * args.height, stride[1] * patch[1])
            return size["wh"]

        with blame(where):
            frame = read_image(image, size_for)
        width, height = size["wh"]
        with blame("video size"):
            images[image] = latent_shape(args.frames, height, width, patch, stride), frame
    return images


def i2v_conditions(args, images: dict, vae, device: torch.device, dtype: torch.dtype) -> dict:
    """{image path: (latent shape, {clip_fea, y})}: each image's conditions as preprocessing builds them."""
    from engine.model.encoders import image_conditions

    encoder = image_encoder(args, device, dtype)
    return {image: (shape, image_conditions(frame[:, None].expand(-1, args.frames, -1, -1), encoder, vae))
            for image, (shape, frame) in images.items()}


def run(args) -> None:
    from safetensors.torch import save_file

    from engine.atomic import atomic_file, atomic_write_text
    from engine.data.video import write_mp4
    from engine.model.encoders import VAE
    from engine.model.lora import apply_lora, read_lora
    from engine.model.sampling import VAE_STRIDE, latent_shape, sample_videos
    from engine.model.weights import read_config

    for key, value in sampling_defaults(args.synthetic).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_settings(args)
    records = [(p, None, None, "--prompt") for p in args.prompt] if args.prompt else read_prompts(args.prompts)
    records = [(p, seed, image or args.image, where) for p, seed, image, where in records]
    jobs = [(prompt, seed, image) for prompt, own, image, _ in records
            for seed in ([own] if own is not None else args.seeds)]
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"--device {args.device}: expected a torch device, e.g. cuda, cuda:1 or cpu") from None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]

    with blame(f"--model {args.model}"):
        config = read_config(args.model)
    i2v = config.model_type == "i2v"
    if i2v and args.synthetic:
        raise InputError(f"--model {args.model}: an i2v model; --synthetic samples the text-to-video benchmark")
    if not i2v and any(image is not None for *_, image, _ in records):
        raise InputError(f"--model {args.model}: a {config.model_type} model takes no image (--image, \"image\")")
    if i2v:
        missing = next((where for _, _, image, where in records if image is None), None)
        if missing is not None:
            raise InputError(f"{missing}: --model {args.model} is an i2v model: each prompt needs an image "
                             "(a JSONL record's \"image\", or --image)")
        if args.vae is None:
            raise InputError(f"--model {args.model} is an i2v model: it needs --vae (the first frame's condition "
                             "is VAE-encoded)")
    vae = None
    if args.vae is not None:
        with blame(f"--vae {args.vae}"):
            vae = VAE.from_pretrained(args.vae, device, tiling=args.vae_tiling)
        if vae.model.config.z_dim != config.out_dim:
            raise InputError(f"--vae {args.vae}: {vae.model.config.z_dim} latent channels; --model {args.model} "
                             f"makes {config.out_dim}")
    stride = VAE_STRIDE if vae is None else (vae.temporal_stride, vae.spatial_stride, vae.spatial_stride)
    with blame("video size"):
        shape = latent_shape(args.frames, args.height, args.width, config.patch_size, stride)
    images = read_images(args, records, config.patch_size, stride) if i2v else {}

    # Every prompt and image is encoded before the DiT loads, so the encoders and the DiT never share the device.
    encode, width = text_encoder(args, device, dtype)
    if width != config.text_dim:
        source = "--synthetic's toy encoder" if args.synthetic else f"--text-encoder {args.text_encoder}"
        raise InputError(f"{source}: width {width}; --model {args.model} expects text_dim {config.text_dim}")
    contexts = {}
    for prompt, _, _, where in records:
        if prompt not in contexts:
            with blame(where):
                contexts[prompt] = encode(prompt)
    negative = None
    if args.guidance != 1.0:
        with blame("--negative-prompt"):
            negative = encode(args.negative_prompt)
    del encode
    images = i2v_conditions(args, images, vae, device, dtype) if i2v else {}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with blame(f"--model {args.model}"):
        model = load_dit(args.model, dtype=dtype, device=device).eval()
    if args.lora is not None:
        with blame(f"--lora {args.lora}"):
            apply_lora(model, read_lora(args.lora, model), args.lora_scale)

    settings = {"model": str(args.model.resolve()),
                **({"lora": str(args.lora.resolve()), "lora_scale": args.lora_scale} if args.lora else {}),
                "text_encoder": "synthetic" if args.synthetic else str(args.text_encoder.resolve()),
                "steps": args.steps, "solver": args.solver, "shift": args.shift, "guidance": args.guidance,
                **({"negative_prompt": args.negative_prompt} if negative is not None else {}),
                "frames": args.frames, "height": args.height, "width": args.width,
                "dtype": str(dtype).removeprefix("torch."), **({"fps": args.fps} if vae else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for batch in batches(jobs, args.batch_size, lambda job: images[job[2]][0] if i2v else shape):
        start = len(written)
        batch_shape, conditions = images[batch[0][2]] if i2v else (shape, {})
        extra = {k: [images[image][1][k] for _, _, image in batch] for k in conditions}
        latents = sample_videos(model, [contexts[p] for p, _, _ in batch], [s for _, s, _ in batch], batch_shape,
                                negative, steps=args.steps, solver=args.solver, shift=args.shift,
                                guidance_scale=args.guidance, **extra)
        for index, (prompt, seed, image), video in zip(range(start, start + len(batch)), batch, latents):
            height, width = batch_shape[1] * stride[1], batch_shape[2] * stride[2]
            record = {"index": index, "latents": f"{index:05d}.safetensors", "prompt": prompt, "seed": seed,
                      **settings, "latent_shape": list(batch_shape),
                      **({"image": str(image.resolve()), "height": height, "width": width} if i2v else {})}
            metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()
                        if k not in ("index", "latents")}
            tensors = {"latents": video.contiguous(), "context": contexts[prompt].contiguous(),
                       **{k: v.contiguous() for k, v in (images[image][1] if i2v else {}).items()}}
            with atomic_file(args.out / record["latents"]) as staging:
                save_file(tensors, staging, metadata=metadata)
            if vae is not None:
                record["video"] = write_mp4(args.out / f"{index:05d}.mp4", vae.decode(video), args.fps).name
            written.append(record)
        atomic_write_text(args.out / INDEX, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written))
        print(f"sample: {len(written)}/{len(jobs)} videos -> {args.out}", flush=True)
    print(f"sample: wrote {len(written)} latents{' and mp4s' if vae else ''} and {args.out / INDEX}")


def batches(jobs: list, size: int, shape_of) -> list[list]:
    """Consecutive jobs in batches of at most `size`, each of one latent shape (i2v: each image's own size)."""
    out: list[list] = []
    for job in jobs:
        if out and len(out[-1]) < size and shape_of(out[-1][0]) == shape_of(job):
            out[-1].append(job)
        else:
            out.append([job])
    return out


def parser() -> argparse.ArgumentParser:
    wan, toy = sampling_defaults(synthetic=False), sampling_defaults(synthetic=True)

    def defaults(key: str) -> str:
        return f"{wan[key]} / {toy[key]}" if wan[key] != toy[key] else f"{wan[key]}"

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.strip().splitlines()[2:]))
    model = p.add_argument_group("generator")
    model.add_argument("--model", type=Path, required=True,
                       help="DiT checkpoint: an original Wan2.1 or diffusers transformer folder, a single "
                            ".safetensors, or our exports (a PRFL / SFT checkpoint's model/)")
    model.add_argument("--lora", type=Path, help="LoRA merged on top of --model: our export's lora/ folder, its "
                                                 "pytorch_lora_weights.safetensors or lora_wan_original.safetensors")
    model.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the LoRA update (default 1)")
    prompts = p.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    prompts.add_argument("--prompts", type=Path, metavar="FILE",
                         help="one prompt per line, or a .jsonl file of {\"prompt\": ..., \"seed\": N (optional)}")
    text = p.add_argument_group("text encoding (one of)")
    text.add_argument("--text-encoder", type=Path, metavar="PATH",
                      help="umT5 folder (transformers UMT5EncoderModel), e.g. <Wan2.1 diffusers pipeline>/text_encoder")
    text.add_argument("--tokenizer", type=Path, metavar="PATH",
                      help="default: the --text-encoder folder if it holds a tokenizer, else its sibling tokenizer/")
    text.add_argument("--synthetic", action="store_true",
                      help="the synthetic motion benchmark's toy text encoder, latent shape and sampling defaults")
    image = p.add_argument_group("image-to-video (an i2v --model)")
    image.add_argument("--image", type=Path, help="the image of every prompt that names none (JSONL \"image\")")
    image.add_argument("--image-encoder", type=Path, metavar="PATH",
                       help="CLIP vision model folder (default: image_encoder/ beside --text-encoder)")
    image.add_argument("--image-processor", type=Path, metavar="PATH",
                       help="CLIP image processor folder (default: image_processor/ beside --text-encoder)")
    chain = p.add_argument_group("sampling (defaults: Wan models / --synthetic)")
    chain.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], metavar="N",
                       help="noise seeds; every prompt is sampled once per seed (default 0)")
    chain.add_argument("--steps", type=int, help=f"denoising steps ({defaults('steps')})")
    chain.add_argument("--solver", choices=("unipc", "euler"), help=f"diffusers scheduler ({defaults('solver')})")
    chain.add_argument("--shift", type=float, help=f"timestep shift ({defaults('shift')})")
    chain.add_argument("--guidance", type=float,
                       help=f"classifier-free guidance scale, 1 = off ({defaults('guidance')})")
    chain.add_argument("--negative-prompt",
                       help="what guidance (when != 1) steers away from (Wan's default negative prompt / the empty "
                            "prompt); \"\" is encoded like any prompt, as diffusers' WanPipeline does")
    chain.add_argument("--batch-size", type=int, default=1, help="videos denoised together (default 1)")
    size = p.add_argument_group("video size in pixels (latent grid: (F - 1) / 4 + 1 frames, H / 8, W / 8; i2v: the "
                                "image's aspect ratio at about W x H pixels)")
    size.add_argument("--frames", type=int, help=f"4n + 1 frames ({defaults('frames')})")
    size.add_argument("--height", type=int, help=f"a multiple of 16 ({defaults('height')})")
    size.add_argument("--width", type=int, help=f"a multiple of 16 ({defaults('width')})")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty folder")
    out.add_argument("--vae", type=Path, metavar="PATH", help="decode to mp4 with this Wan2.1 VAE: an "
                                                              "AutoencoderKLWan folder or Wan2.1_VAE.pth")
    out.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory at 720P)")
    out.add_argument("--fps", type=float, default=16.0, help="mp4 frame rate (default 16, Wan's)")
    run_on = p.add_argument_group("device")
    run_on.add_argument("--device", help="default: cuda if available, else cpu")
    run_on.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="DiT and text encoder parameters (auto: bfloat16 on GPU, float32 on CPU; the VAE "
                             "always runs in float32)")
    return p


def main(argv=None) -> int:
    args_parser = parser()
    args = args_parser.parse_args(argv)
    try:
        run(args)
    except InputError as e:
        args_parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
