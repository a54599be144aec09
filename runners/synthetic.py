"""The synthetic motion benchmark: write its dataset, sample a generator on held-out pairs, judge a folder, train
its base generator and PAVRM.

    python runners/synthetic.py write --out data/synthetic --per-kind 48
    python runners/synthetic.py sample --model runs/synthetic-base/checkpoints/step_N/model --out samples/base
    python runners/synthetic.py judge samples/base
    python runners/synthetic.py label --model assets/synthetic/base --out data/synthetic-generated  # PAVRM data
    python runners/synthetic.py bootstrap --out assets/synthetic [train.steps=20 ...]   # base/ and pavrm/
    python runners/synthetic.py bootstrap --recipe configs/prfl-synthetic-i2v.yaml      # the first-frame variant's

A generator of the first-frame (i2v) variant samples each pair conditioned on the first frame of its rendered smooth
video; the files keep that condition (`y`), against which `judge` also checks the start.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.weights import load_dit


def write(args) -> None:
    from engine.data.format import write_list, write_sample
    from engine.synthetic.scene import MOTIONS, PROMPTS, encode_prompt, labels, null_prompt_embedding, render

    metas = []
    for motion in MOTIONS:
        for i in range(args.per_kind):
            prompt, seed = PROMPTS[i % len(PROMPTS)], args.seed * 1_000_003 + i
            tensors = {"latents": render(prompt, motion, seed), "context": encode_prompt(prompt)}
            meta = {"prompt": prompt, "seed": seed, **labels(motion)}
            metas.append(write_sample(args.out, f"{motion}_{i:05d}", tensors, meta))
    path = write_list(args.out, args.split, metas, null_prompt_embedding())
    print(f"wrote {len(metas)} samples ({args.per_kind} per motion kind) and {path}")


def sample(args) -> None:
    from engine.synthetic.dataset import generate, held_out_pairs
    from engine.synthetic.scene import first_frame_inputs

    model = load_dit(args.model).eval()
    pairs = held_out_pairs(args.pairs, seed=args.seed)
    latents = generate(model, pairs, steps=args.steps, shift=args.shift, guidance_scale=args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, ((prompt, seed), video) in enumerate(zip(pairs, latents)):
        condition = {"y": first_frame_inputs(prompt, "smooth", seed)["y"]} if model.config.model_type == "i2v" else {}
        save_file({"latents": video.contiguous(), **condition}, args.out / f"{i:05d}.safetensors",
                  metadata={"prompt": prompt, "seed": str(seed)})
    print(f"wrote {len(pairs)} samples to {args.out}")


def judge_folder(args) -> None:
    from engine.synthetic.judge import judge, summarize
    from engine.synthetic.scene import condition_frame

    files = sorted(args.folder.glob("*.safetensors"))
    if not files:
        sys.exit(f"error: {args.folder} holds no *.safetensors samples")
    verdicts, prompts = [], []
    for file in files:
        with safe_open(file, framework="pt") as f:
            prompt = (f.metadata() or {}).get("prompt")
            if prompt is None:
                sys.exit(f"error: {file} has no 'prompt' in its safetensors metadata")
            condition = condition_frame(f.get_tensor("y")) if "y" in f.keys() else None
            verdicts.append(judge(f.get_tensor("latents"), prompt, condition))
            prompts.append(prompt)
    print(json.dumps(summarize(verdicts, prompts), indent=2))


def label(args) -> None:
    from engine.synthetic.labelled import write_generated

    counts = write_generated(load_dit(args.model), args.out, count=args.count, val_count=args.val_count,
                             rendered_per_kind=args.rendered_per_kind, steps=args.steps, shift=args.shift)
    print(json.dumps(counts, indent=2))
    print(f"wrote {args.out}/{{train,val}}.list (CE) and {{train,val}}_pairs.list (BT)")


def bootstrap(args) -> None:
    import dataclasses

    from engine.config_io import load_config
    from engine.errors import BootstrapError, ConfigError
    from engine.synthetic.bootstrap import bootstrap as train_missing

    try:
        recipe = load_config(args.recipe)
        config = dataclasses.replace(recipe.bootstrap, overrides=[*recipe.bootstrap.overrides, *args.overrides])
        out = args.out or Path(recipe.model.path).parent
        train_missing(config, out / "base", out / "pavrm", args.work)
    except (BootstrapError, ConfigError) as e:
        sys.exit(f"error: {e}")
    print(f"{out / 'base'} and {out / 'pavrm'} are ready")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("write", help="render the labelled dataset to disk (latents + toy text embeddings)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-kind", type=int, default=48, help="samples per motion kind")
    p.add_argument("--split", default="train", help="name of the list file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=write)
    p = commands.add_parser("sample", help="sample a generator on held-out (prompt, seed) pairs")
    p.add_argument("--model", required=True, help="DiT checkpoint folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--guidance", type=float, default=1.0)
    p.set_defaults(run=sample)
    p = commands.add_parser("judge", help="judge a folder of latents; prints pass rate and diversity")
    p.add_argument("folder", type=Path)
    p.set_defaults(run=judge_folder)
    p = commands.add_parser("label", help="a PAVRM dataset of a generator's own samples, labelled by the judge "
                            "(engine/synthetic/labelled.py)")
    p.add_argument("--model", required=True, help="DiT checkpoint folder (the generator PRFL will train)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=1920, help="training samples of the generator")
    p.add_argument("--val-count", type=int, default=256, help="held-out samples of the generator (validation)")
    p.add_argument("--rendered-per-kind", type=int, default=0, help="rendered videos per motion kind mixed in")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (the PRFL recipe's chain)")
    p.add_argument("--shift", type=float, default=3.0)
    p.set_defaults(run=label)
    p = commands.add_parser("bootstrap", help="train a PRFL recipe's base generator and its PAVRM (its bootstrap "
                            "section: for the default, configs/synthetic-base-smooth.yaml then configs/synthetic-base."
                            "yaml, and configs/pavrm-synthetic.yaml with bootstrap.reward_overrides: varied looks) into "
                            "OUT/base and OUT/pavrm, whichever is missing")
    p.add_argument("--recipe", type=Path, default=Path("configs/prfl-synthetic.yaml"),
                   help="the PRFL recipe whose bootstrap section to run (default: the main command's)")
    p.add_argument("--out", type=Path, help="default: the folder of the recipe's model.path (assets/synthetic)")
    p.add_argument("--work", type=Path, default=Path("outputs/bootstrap"), help="the two training runs' folders")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both trainers")
    p.set_defaults(run=bootstrap)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
