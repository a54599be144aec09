"""Train a process-aware video reward model (PAVRM) on labelled or paired latents, with DeepSpeed.

    deepspeed [--num_gpus N] runners/pavrm.py --ds_config ds_configs/z3_offload.json
              [--config configs/pavrm-synthetic.yaml] [--resume auto|CHECKPOINT] [--dry-run] [key=value ...]

Checkpoints export a reward model folder (`RewardModel.from_pretrained`) to `<run>/checkpoints/step_N/model`;
validation (the paper's five noise intervals, ROC-AUC) goes to the console, tensorboard and `<run>/validation.json`.
"""

import sys

import engine.synthetic  # noqa: F401  (the synthetic benchmark: its presets and data source)
from engine.distributed.process import exit_process
from engine.errors import ConfigError
from engine.steps.reward import RewardStep, RewardValidation
from engine.train.cli import parse_run, print_dry_run
from engine.train.estimate import dry_run
from engine.train.specs import RewardSpec
from engine.train.trainer import Trainer


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/pavrm-synthetic.yaml", argv)
    spec = RewardSpec(config)
    try:
        if args.dry_run:
            print_dry_run(config, dry_run(config, ds_config, spec))
            return 0
        trainer = Trainer(config, ds_config, spec, resume=args.resume)
        validation = RewardValidation(config, spec.validation_dataset(trainer.transformer.config), trainer.run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit(RewardStep(config.reward), evaluate=validation if config.train.eval_every else None)
    return 0


if __name__ == "__main__":
    exit_process(main())
