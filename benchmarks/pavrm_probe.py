"""Can the PAVRM head find motion in a trunk's features? A fast probe on the synthetic motion benchmark.

    python -m benchmarks.pavrm_probe                     # random tiny trunks: patch (1,2,2) / (2,2,2) x scale 1 / 20
    python -m benchmarks.pavrm_probe --generator assets/synthetic/base --sigma 0.3
    python -m benchmarks.pavrm_probe --smoke             # tiny sizes: checks the script, numbers mean nothing

For each task (smooth against one bad kind, and all four kinds with `motion_quality`), trunk patch size and
`attention_scale`, only the head trains (engine.model.reward's query-attention pooling and MLP), on trunk features that
are computed once: a case takes about a minute on 2 cores, so the benchmark's and the head's design can be checked
before a full `runners/pavrm.py` run. The trunk is frozen, so a task the probe cannot learn needs the trunk to learn
it, or the benchmark to show it differently. Each sample keeps one noise draw for all epochs (the head can overfit
it at high sigma). Writes benchmarks/results/pavrm_probe-<random|generator>-sigma<sigma>-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.data.datasets import collate
from engine.model.dit import DiT, DiTConfig
from engine.model.flow import add_noise, timestep_from_sigma
from engine.model.reward import RewardModel, RewardModelConfig
from engine.model.weights import load_dit
from engine.synthetic.dataset import SyntheticMotion
from engine.synthetic.scene import MOTIONS

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"smooth vs static": ("smooth", "static"), "smooth vs jitter": ("smooth", "jitter"),
         "smooth vs vanish": ("smooth", "vanish"), "all four": MOTIONS}


@torch.no_grad()
def trunk_features(trunk: DiT, dataset: SyntheticMotion, sigma: float, blocks: int, batch_size: int = 64):
    """Features [N, S, D] of the last trunk block for noisy latents at `sigma`, and labels [N]. The noise is drawn
    once per sample from the dataset's seed, so training and validation never share a noise draw."""
    features, labels = [], []
    noise = torch.Generator().manual_seed(dataset.seed)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        sigmas = torch.full((len(batch["latents"]),), sigma)
        x = add_noise(batch["latents"], torch.randn(batch["latents"].shape, generator=noise), sigmas)
        features.append(trunk(x, timestep_from_sigma(sigmas), batch["context"], return_features=[blocks])[0])
        labels.append(batch["motion_quality"])
    return torch.cat(features), torch.cat(labels)


def probe(trunk: DiT, head: RewardModelConfig, train, val, epochs: int, seed: int) -> dict:
    """Train the head alone on cached features; accuracy on train and validation, and the validation mean logit
    spread (0 means a constant output: the head found nothing)."""
    torch.manual_seed(seed)
    model = RewardModel(head, trunk)
    params = [*model.pool.parameters(), *model.mlp.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    (x_train, y_train), (x_val, y_val) = train, val
    for _ in range(epochs):
        for index in torch.randperm(len(x_train)).split(16):
            loss = F.binary_cross_entropy_with_logits(model.head(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        train_logits, val_logits = model.head(x_train), model.head(x_val)
    return {"train_accuracy": ((train_logits > 0) == (y_train > 0.5)).float().mean().item(),
            "val_accuracy": ((val_logits > 0) == (y_val > 0.5)).float().mean().item(),
            "val_majority": max(y_val.mean().item(), 1 - y_val.mean().item()),
            "val_logit_std": val_logits.std().item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", help="trunk from this generator checkpoint (default: random tiny trunks)")
    parser.add_argument("--blocks", type=int, default=2, help="trunk depth K")
    parser.add_argument("--patch", nargs="+", default=["1,2,2", "2,2,2"], help="random trunks' patch sizes")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 20.0], help="attention_scale values")
    parser.add_argument("--sigma", type=float, default=0.0, help="noise level of the probed latents")
    parser.add_argument("--train-samples", type=int, default=3072)
    parser.add_argument("--val-samples", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/results; smoke: a temporary one)")
    args = parser.parse_args()
    if args.smoke:
        args.train_samples, args.val_samples, args.epochs, args.scales = 32, 16, 1, args.scales[:1]
    if args.generator:
        trunks = {"generator": load_dit(args.generator, num_layers=args.blocks)}
    else:
        torch.manual_seed(0)
        trunks = {p: DiT(DiTConfig.preset("tiny", num_layers=args.blocks, text_len=16,
                                          patch_size=tuple(int(v) for v in p.split(","))))
                  for p in args.patch}
    rows = []
    for trunk_name, trunk in trunks.items():
        trunk.eval()
        for task, motions in TASKS.items():
            started = time.time()
            train = trunk_features(trunk, SyntheticMotion(args.train_samples, seed=0, motions=motions), args.sigma,
                                   args.blocks)
            val = trunk_features(trunk, SyntheticMotion(args.val_samples, seed=1, motions=motions), args.sigma,
                                 args.blocks)
            for scale in args.scales:
                head = RewardModelConfig(blocks=args.blocks, num_queries=4, num_heads=4, mlp_dims=(256, 128),
                                         attention_scale=scale)
                rows.append({"trunk": trunk_name, "task": task, "attention_scale": scale,
                             **probe(trunk, head, train, val, args.epochs, seed=0),
                             "seconds": round(time.time() - started, 1)})
                print(rows[-1], flush=True)
    device = platform.processor() or platform.machine()
    report = {"device": device, "threads": torch.get_num_threads(), "smoke": args.smoke, "sigma": args.sigma,
              "blocks": args.blocks, "generator": args.generator, "train_samples": args.train_samples,
              "epochs": args.epochs, "rows": rows}
    results_dir = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results")
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"pavrm_probe-{'generator' if args.generator else 'random'}-sigma{args.sigma:g}-cpu"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# PAVRM head probe ({'generator ' + args.generator if args.generator else 'random tiny trunks'}, "
             f"sigma {args.sigma:g}, {args.blocks} frozen blocks, {device}, {report['threads']} threads)", "",
             "| trunk | task | attention_scale | train acc | val acc | val majority | val logit std |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trunk']} | {r['task']} | {r['attention_scale']:g} | {r['train_accuracy']:.3f} | "
              f"{r['val_accuracy']:.3f} | {r['val_majority']:.3f} | {r['val_logit_std']:.3f} |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
