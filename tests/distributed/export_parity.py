"""Launched by tests/test_engine.py on 2 ranks: train a few ZeRO-3 steps, then check that the exported safetensors,
loaded with load_dit, reproduce the engine model's output (ZeRO-3 forward, parameters partitioned), and
that a forward inside `Trainer.full_parameters()` (parameters gathered for evaluation) does too."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config_io import load_config
from engine.distributed.process import exit_process
from engine.model.weights import load_dit
from engine.steps.sft import SFTStep
from engine.train.trainer import Trainer
from tests.conftest import dit_inputs

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    run_dir = sys.argv[sys.argv.index("--run_dir") + 1]
    config = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={run_dir}", "train.steps=2", "train.lr=1e-2",
                                                      "train.eval_every=1"])
    ds_config = json.loads((ROOT / "ds_configs/z3_offload.json").read_text())
    trainer = Trainer(config, ds_config)
    inputs = dit_inputs(trainer.model.config, batch=1)

    def evaluate(trainer):  # the periodic evaluation hook, on gathered parameters
        with trainer.full_parameters() as model:
            return {"eval/output_rms": model(**inputs).square().mean().sqrt().item()}

    trainer.fit(SFTStep(config.sft, trainer.dataset.null_context), evaluate=evaluate)
    if dist.get_rank() == 0:
        logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        if [(m["step"], "eval/output_rms" in m) for m in logged] != [(0, True), (1, True), (2, True)]:
            print(f"evaluation hook did not run before training and at every step: {logged}", flush=True)
            return 1
    with torch.no_grad():
        engine_out = trainer.engine(**inputs)
    with trainer.full_parameters() as model:  # every rank holds the whole model here
        gathered_err = (model(**inputs) - engine_out).abs().max().item()
    if gathered_err > 1e-6:
        print(f"gathered-parameter forward differs from the engine by {gathered_err:.2e}", flush=True)
        return 1
    if dist.get_rank() == 0:
        exported = load_dit(Path(run_dir) / "checkpoints/step_000002/model")
        with torch.no_grad():
            err = (exported(**inputs) - engine_out).abs().max().item()
        print(f"export vs engine max abs err {err:.2e} (output max {engine_out.abs().max().item():.2e})", flush=True)
        if err > 1e-5:
            return 1
    return 0


if __name__ == "__main__":
    exit_process(main())  # like the runners: a DeepSpeed engine's gloo groups can abort the teardown
