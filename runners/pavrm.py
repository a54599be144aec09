"""Train a process-aware video reward model (PAVRM) on labelled or paired latents, with DeepSpeed.

    deepspeed [--num_gpus N] runners/pavrm.py --ds_config ds_configs/z3_offload.json
              [--config configs/pavrm-synthetic.yaml] [--resume auto|CHECKPOINT] [--dry-run] [key=value ...]

Checkpoints export a reward model folder (`RewardModel.from_pretrained`) to `<run>/checkpoints/step_N/model`;
validation (the paper's five noise intervals, ROC-AUC) goes to the console, tensorboard and `<run>/validation.json`.
"""

import sys

from engine.cli import parse_run, print_dry_run
from engine.config import ConfigError
from engine.parallel import exit_process
from engine.reward_training import RewardStep, RewardTrainer, RewardValidation


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/pavrm-synthetic.yaml", argv)
    try:
        if args.dry_run:
            print_dry_run(config, RewardTrainer.dry_run(config, ds_config))
            return 0
        trainer = RewardTrainer(config, ds_config, resume=args.resume)
        validation = RewardValidation(config, trainer.validation_dataset(), trainer.run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit(RewardStep(config.reward), evaluate=validation if config.train.eval_every else None)
    return 0


if __name__ == "__main__":
    exit_process(main())
