"""Flow-matching fine-tuning (SFT) of a Wan2.1 DiT on latents, with DeepSpeed.

    deepspeed [--num_gpus N] runners/sft.py --ds_config ds_configs/z3_offload.json [--config configs/tiny.yaml]
              [--resume auto|CHECKPOINT] [--dry-run] [key=value ...]
"""

import sys

import engine.synthetic  # noqa: F401  (the synthetic benchmark: its presets and data source)
from engine.distributed.process import exit_process
from engine.errors import ConfigError
from engine.steps.sft import SFTStep
from engine.train.cli import parse_run, print_dry_run
from engine.train.estimate import dry_run
from engine.train.trainer import Trainer


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/tiny.yaml", argv)
    try:
        if args.dry_run:
            print_dry_run(config, dry_run(config, ds_config))
            return 0
        trainer = Trainer(config, ds_config, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit(SFTStep(config.sft, trainer.dataset.null_context.to(trainer.device)))
    return 0


if __name__ == "__main__":
    exit_process(main())
