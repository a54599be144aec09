"""Reward-model data as the paper builds it: the generator's own videos, rated. The paper's PAVRM learns from its
generator's samples labelled by people; here the judge rates them. A PAVRM that learned only from rendered videos
rewards what tells rendered from generated videos apart (benchmarks/results/pavrm_shift.md), not what the judge checks.

    python runners/synthetic.py label --model assets/synthetic/base --out data/synthetic-generated

writes a list dataset (engine/data/format.py) of `count` training samples and `val_count` held-out ones:

    train.list, val.list              every sample, for CE (reward.loss: ce)
    train_pairs.list, val_pairs.list  the samples in a preference pair, for BT (reward.loss: bt)

Each sample holds the generator's latents for one (prompt, seed) pair of its own seed range (disjoint from the
held-out pairs of reports and from the rendered datasets' seeds), the prompt's toy text embedding and, for an i2v
generator, its first-frame condition. Its meta carries the judge's verdict as labels (motion_quality: it passed;
physics_quality: the path tests held; human_quality: the object, direction and start tests held) and the tests that
failed. A BT pair is a passing and a failing sample of one prompt, matched in seed order. Rendered videos of the
even mix of kinds, in varied looks, can be mixed in (`rendered_per_kind`), labelled by the judge too: a rendered
smooth path with a bloated object is not a good video, whatever its motion kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.data.format import write_list, write_sample
from engine.synthetic.dataset import generate
from engine.synthetic.judge import judge
from engine.synthetic.scene import (
    MOTIONS,
    PROMPTS,
    condition_frame,
    encode_prompt,
    first_frame_inputs,
    null_prompt_embedding,
    render,
    varied_look,
)

PHYSICS_TESTS = ("tracked", "displacement", "jump", "acceleration")  # the others: the object and the prompt's asks
SEEDS = {"train": 20_000_000, "val": 30_000_000}  # first noise seed of each split's pairs


def split_pairs(split: str, count: int) -> list[tuple[str, int]]:
    """A split's (prompt, noise seed) pairs, cycling through every prompt."""
    return [(PROMPTS[i % len(PROMPTS)], SEEDS[split] + i) for i in range(count)]


def verdict_labels(verdict) -> dict:
    """The judge's verdict in the reference meta files' label fields, and the tests that failed."""
    physics = not set(verdict.failed) & set(PHYSICS_TESTS)
    return {"physics_quality": int(physics), "human_quality": int(not set(verdict.failed) - set(PHYSICS_TESTS)),
            "motion_quality": int(verdict.passed), "failed": verdict.failed}


def _preference_pairs(metas: list[dict]) -> list[tuple[int, int]]:
    """Per prompt, its passing and its failing samples matched in order: (passing, failing) index pairs."""
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for index, meta in enumerate(metas):
        by_prompt.setdefault(meta["prompt"], ([], []))[0 if meta["motion_quality"] else 1].append(index)
    return [pair for good, bad in by_prompt.values() for pair in zip(good, bad)]


def _write_split(model, out: Path, split: str, count: int, rendered_per_kind: int, steps: int, shift: float
                 ) -> dict:
    i2v = model.config.model_type == "i2v"
    pairs = split_pairs(split, count)
    latents = generate(model, pairs, steps=steps, shift=shift)
    samples = []  # (sample id, tensors, meta)
    for (prompt, seed), video in zip(pairs, latents):
        condition = first_frame_inputs(prompt, "smooth", seed) if i2v else {}
        verdict = judge(video, prompt, condition_frame(condition["y"]) if i2v else None)
        samples.append((f"{split}_generated_{seed}", {"latents": video, "context": encode_prompt(prompt), **condition},
                        {"prompt": prompt, "seed": seed, "origin": "generated", **verdict_labels(verdict)}))
    for motion in MOTIONS:
        for i in range(rendered_per_kind):
            prompt, seed = PROMPTS[i % len(PROMPTS)], SEEDS[split] + count + i
            condition = first_frame_inputs(prompt, motion, seed) if i2v else {}
            video = render(prompt, motion, seed, look=varied_look(seed))
            verdict = judge(video, prompt, condition_frame(condition["y"]) if i2v else None)
            samples.append((f"{split}_rendered_{motion}_{seed}",
                            {"latents": video, "context": encode_prompt(prompt), **condition},
                            {"prompt": prompt, "seed": seed, "origin": "rendered", "motion": motion,
                             **verdict_labels(verdict)}))
    metas = [meta for _, _, meta in samples]
    preferences = _preference_pairs(metas)
    for number, (good, bad) in enumerate(preferences):
        for index, preferred in ((good, True), (bad, False)):
            metas[index].update(pair_id=f"{split}-{number}", preferred=preferred)
    paths = [write_sample(out, sample_id, tensors, meta) for sample_id, tensors, meta in samples]
    write_list(out, split, paths, null_prompt_embedding())
    write_list(out, f"{split}_pairs", [paths[i] for pair in preferences for i in pair], null_prompt_embedding())
    generated = [m for m in metas if m["origin"] == "generated"]
    return {"samples": len(samples), "generated": len(generated),
            "generated_pass_rate": sum(m["motion_quality"] for m in generated) / max(len(generated), 1),
            "pairs": len(preferences)}


@torch.no_grad()
def write_generated(model, out: str | Path, count: int = 1920, val_count: int = 256, rendered_per_kind: int = 0,
                    steps: int = 10, shift: float = 3.0) -> dict[str, dict]:
    """Sample `model` on each split's pairs, judge and write the list dataset described above; per split, how many
    samples, pairs and the generator's pass rate."""
    out = Path(out)
    return {split: _write_split(model.eval(), out, split, n, rendered_per_kind, steps, shift)
            for split, n in (("train", count), ("val", val_count))}
