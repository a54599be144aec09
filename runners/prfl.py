"""PRFL fine-tuning of a Wan2.1 DiT against a frozen latent reward model (PAVRM), with DeepSpeed.

    deepspeed [--num_gpus N] runners/prfl.py --ds_config ds_configs/z3_offload.json [--config RECIPE]
              [reward.path=REWARD_MODEL_FOLDER] [--resume auto|CHECKPOINT] [--dry-run] [key=value ...]

Without --config it runs configs/prfl-synthetic.yaml: PRFL on the synthetic motion benchmark from a tiny base
generator against its PAVRM (assets/synthetic/{base,pavrm}, trained first when missing: `bootstrap.*`).

Each optimizer step: per micro-batch, the generator's sampling chain (`sampling.*`) is rolled out from fresh
noise to a random step k without gradients, step k is taken with gradients, the frozen reward model scores the
result, and the flow-matching loss on the batch's latents is added (`prfl.*`). Fixed prompts are sampled before
training and every `train.eval_every` steps (`eval.*`); on synthetic data, `eval.held_out_pairs` held-out pairs
before training and after the last step give `<run>/summary.json`. Checkpoints export the generator.
`prfl.mode=rgb_refl` trains the pixel-space RGB ReFL baseline instead (`rgb_refl.*`), with the same loop.
"""

import dataclasses
import sys
from pathlib import Path

import engine.synthetic  # noqa: F401  (the synthetic benchmark: its presets and data source)
from engine.distributed.process import exit_process
from engine.errors import BootstrapError, ConfigError
from engine.evaluation import SampleEvaluation, validation_prompts
from engine.model.dit import DiTConfig
from engine.model.reward import RewardModel
from engine.model.weights import read_config
from engine.steps.feedback import FeedbackWithSFTStep
from engine.steps.prfl import PRFLStep, check_reward_model
from engine.steps.sft import SFTStep
from engine.synthetic.bootstrap import ensure_assets
from engine.synthetic.report import HeldOutReport
from engine.train.cli import parse_run, print_dry_run
from engine.train.estimate import dry_run
from engine.train.specs import RewardSpec, generator_config
from engine.train.trainer import Trainer


def generator_source(config) -> str:
    return f"model.path={config.model.path}" if config.model.path else f"model.preset={config.model.preset}"


def check_reward_task(config, generator: DiTConfig) -> None:
    """A PAVRM of the generator's task (t2v / i2v), read from its folder's config before anything is built."""
    check_reward_model(generator, read_config(Path(config.reward.path) / "trunk"), generator_source(config),
                       f"reward.path={config.reward.path}")


def reward_on_meta(config) -> tuple[RewardModel | None, str]:
    """The PAVRM as the run will build it, on the meta device, for the dry run, and where it came from: reward.path's
    folder once it exists (its task checked against the generator's), else reward.model on the generator's first
    blocks (a PAVRM not trained yet)."""
    folder = Path(config.reward.path) if config.reward.path else None
    if folder is not None and folder.exists():
        check_reward_task(config, generator_config(config))
        return RewardSpec(config).meta_model(), str(folder)
    if config.prfl.mode != "prfl":
        return None, "none"
    untrained = dataclasses.replace(config, reward=dataclasses.replace(config.reward, path=None))
    return RewardSpec(untrained).meta_model(), \
        f"reward.model ({folder} does not exist yet: estimated from the architecture it will have)"


def load_reward_model(trainer: Trainer) -> RewardModel:
    """The frozen PAVRM, run like the generator (sequence-parallel, blocks checkpointed): only the gradient with
    respect to its input latent flows, so it holds no optimizer state and keeps no parameter gradient."""
    model_config = trainer.config.model
    check_reward_task(trainer.config, trainer.transformer.config)
    reward = RewardModel.from_pretrained(trainer.config.reward.path, dtype=trainer.dtype,
                                         attention_backend=model_config.attention_backend,
                                         kernel_backend=model_config.kernel_backend)
    reward.to(trainer.device).requires_grad_(False).eval()
    trainer.distribute(reward.trunk)
    return reward


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/prfl-synthetic.yaml", argv)
    try:
        if config.prfl.mode == "prfl" and config.reward.path is None:
            raise ConfigError("reward.path is not set: PRFL needs a trained reward model folder (train one with "
                              "runners/pavrm.py; its checkpoints/step_N/model)")
        if args.dry_run:
            for path in (config.model.path, config.reward.path) if config.bootstrap.enabled else ():
                if not Path(path).exists():
                    raise ConfigError(f"{path} does not exist yet: a run trains it first (bootstrap.enabled), a dry "
                                      "run does not; `python -m runners.synthetic bootstrap` writes it")
            reward, source = reward_on_meta(config)
            print_dry_run(config, {**dry_run(config, ds_config, frozen=reward), "reward_model": source})
            return 0
        if config.bootstrap.enabled:
            ensure_assets(config)
        trainer = Trainer(config, ds_config, resume=args.resume)
        null_context = trainer.dataset.null_context.to(trainer.device)
        # In rgb_refl mode a PAVRM, when given, only scores the evaluation videos.
        reward = load_reward_model(trainer) if config.reward.path is not None else None
        if config.prfl.mode == "rgb_refl":
            from engine.steps.rgb_refl import build_rgb_refl_step  # transformers' reward models: only when used

            reward_step = build_rgb_refl_step(config, config.rgb_refl, trainer.device, trainer.dtype, null_context)
        else:
            reward_step = PRFLStep(config.prfl, config.sampling, reward, null_context)
        evaluation = None
        if config.train.eval_every:
            evaluation = SampleEvaluation(config, validation_prompts(config, trainer.transformer.config), reward,
                                          trainer.run_dir, trainer.dataset.null_context)
        report = None
        if config.data.source == "synthetic":
            report = HeldOutReport(config, trainer.transformer.config, reward, trainer.run_dir,
                                   trainer.dataset.null_context)
    except (ConfigError, ValueError, FileNotFoundError, BootstrapError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = FeedbackWithSFTStep(reward_step, SFTStep(config.sft, null_context), config.prfl.sft_weight)
    if report is not None:
        report.measure(trainer, "before")
    trainer.fit(step, evaluate=evaluation)
    if report is not None:
        report.finish(trainer)
    return 0


if __name__ == "__main__":
    exit_process(main())
