"""Score latent videos with a trained reward model (PAVRM) at given timesteps; write JSONL or CSV.

    python runners/score.py --reward runs/pavrm/checkpoints/step_N/model --list data/val.list \
        --timesteps 0 300 700 --out scores.jsonl
    python runners/score.py --reward PAVRM --folder samples/base --toy-text-encoder --out scores.csv

A sample is a safetensors file with `latents` [16, F, H, W] and `context` [L, text_dim] (the project's on-disk
format, see engine/data/format.py); a list gives prompts through its meta files, a folder through the files' metadata
(`prompt`). The synthetic benchmark's generated samples carry no text embedding: `--toy-text-encoder` encodes
their prompts with its toy encoder. An i2v reward model also reads each sample's `clip_fea` and `y` (runners/sample.py
and runners/preprocess.py store them for i2v). Timestep t is 1000 * sigma; t = 0 scores the clean latent. The noise of a
sample is fixed by `--seed` and the sample's position, so scores at different timesteps share it.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

CONDITION = ("clip_fea", "y")  # an i2v sample's image features and first-frame condition


def samples_from_list(list_file: Path):
    from engine.data.format import LatentListDataset

    dataset = LatentListDataset(list_file)
    for index, (meta, path) in enumerate(zip(dataset.metas, dataset.sample_paths)):
        sample = dataset[index]
        yield str(path), meta.get("prompt", ""), sample["latents"], sample["context"], \
            {k: sample[k] for k in CONDITION if k in sample}


def samples_from_folder(folder: Path, toy_text_encoder: bool):
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors samples")
    for file in files:
        with safe_open(file, framework="pt") as f:
            prompt = (f.metadata() or {}).get("prompt", "")
            if "latents" not in f.keys():
                raise KeyError(f"{file}: no tensor 'latents' (has {', '.join(f.keys())})")
            latents = f.get_tensor("latents")
            condition = {k: f.get_tensor(k) for k in CONDITION if k in f.keys()}
            if "context" in f.keys():
                context = f.get_tensor("context")
            elif toy_text_encoder:
                from engine.synthetic.scene import encode_prompt

                context = encode_prompt(prompt)
            else:
                raise KeyError(f"{file}: no tensor 'context' (the text embedding); for the synthetic benchmark's "
                               "samples pass --toy-text-encoder")
        yield str(file), prompt, latents, context, condition


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--reward", type=Path, required=True, help="reward model folder (RewardModel.from_pretrained)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", type=Path, help="a .list file of the on-disk dataset format")
    source.add_argument("--folder", type=Path, help="a folder of *.safetensors samples")
    parser.add_argument("--timesteps", type=float, nargs="+", default=[0.0], help="t in [0, 1000] (t = 1000 sigma)")
    parser.add_argument("--out", type=Path, required=True, help="output file: .jsonl or .csv")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--toy-text-encoder", action="store_true", help="encode prompts with the synthetic toy encoder")
    args = parser.parse_args(argv)
    if args.out.suffix not in (".jsonl", ".csv"):
        parser.exit(2, f"error: --out {args.out}: expected a .jsonl or .csv file\n")
    if any(not 0 <= t <= 1000 for t in args.timesteps):
        parser.exit(2, f"error: --timesteps {args.timesteps}: expected values in [0, 1000]\n")

    from engine.model.flow import add_noise
    from engine.model.reward import RewardModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = RewardModel.from_pretrained(args.reward, dtype=dtype).to(device).eval()
        samples = samples_from_list(args.list) if args.list else samples_from_folder(args.folder, args.toy_text_encoder)
        rows = []
        with torch.no_grad():
            i2v = model.trunk.config.model_type == "i2v"
            for index, (path, prompt, latents, context, condition) in enumerate(samples):
                if i2v and len(condition) < len(CONDITION):
                    raise KeyError(f"{path}: an i2v reward model needs the sample's {' and '.join(CONDITION)} "
                                   f"(has {', '.join(condition) or 'neither'})")
                condition = {k: v[None].to(device) for k, v in condition.items()} if i2v else {}
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + index))
                for t in args.timesteps:
                    sigma = torch.tensor([t / 1000])
                    x_t = add_noise(latents[None], noise[None], sigma).to(device)
                    logit = model(x_t, torch.tensor([t], device=device), context[None].to(device),
                                  **condition).item()
                    rows.append({"path": path, "prompt": prompt, "timestep": t, "logit": logit,
                                 "probability": torch.sigmoid(torch.tensor(logit)).item()})
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        if args.out.suffix == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"scored {len(rows) // len(args.timesteps)} samples at {len(args.timesteps)} timesteps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
