"""PRFL fine-tuning of a Wan2.1 DiT against a frozen latent reward model (PAVRM), with DeepSpeed.

    deepspeed [--num_gpus N] runners/prfl.py --ds_config ds_configs/z3_offload.json [--config configs/tiny.yaml]
              reward.path=REWARD_MODEL_FOLDER [--resume auto|CHECKPOINT] [--dry-run] [key=value ...]

Each optimizer step: per micro-batch, the generator's sampling chain (`sampling.*`) is rolled out from fresh
noise to a random step k without gradients, step k is taken with gradients, the frozen reward model scores the
result, and the flow-matching loss on the batch's latents is added (`prfl.*`). Checkpoints export the generator
(`DiT.from_pretrained`).
"""

import json
import sys

from engine.cli import parse_run
from engine.config import ConfigError
from engine.evaluation import SampleEvaluation, validation_prompts
from engine.prfl import PRFLStep, PRFLWithSFTStep
from engine.reward import RewardModel
from engine.sft import SFTStep
from engine.trainer import Trainer, dry_run


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/tiny.yaml", argv)
    try:
        if config.reward.path is None:
            raise ConfigError("reward.path is not set: PRFL needs a trained reward model folder (train one with "
                              "runners/pavrm.py; its checkpoints/step_N/model)")
        if args.dry_run:
            print(json.dumps(dry_run(config, ds_config), indent=2))
            return 0
        trainer = Trainer(config, ds_config, resume=args.resume)
        reward = RewardModel.from_pretrained(config.reward.path, dtype=trainer.dtype).to(trainer.device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reward.requires_grad_(False).eval()  # frozen for real: no gradients, no optimizer state
    null_context = trainer.dataset.null_context.to(trainer.device)
    step = PRFLWithSFTStep(PRFLStep(config.prfl, config.sampling, reward, null_context),
                           SFTStep(config.sft, null_context), config.prfl.sft_weight)
    evaluation = None
    if config.train.eval_every:
        evaluation = SampleEvaluation(config, validation_prompts(config, trainer.transformer.config), reward,
                                      trainer.run_dir, trainer.dataset.null_context)
    trainer.fit(step, evaluate=evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
