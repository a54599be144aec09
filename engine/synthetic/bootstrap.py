"""The synthetic benchmark's own models, trained when a run needs them: the base generator (`python -m runners.sft`
with each of `bootstrap.base_recipes` in turn) and its PAVRM (`python -m runners.pavrm` with
`bootstrap.reward_recipe` and `bootstrap.reward_overrides`, trunk from that generator).

    python runners/synthetic.py bootstrap --out assets/synthetic [key=value ...]    # writes base/ and pavrm/
    ensure_assets(run_config)     # runners/prfl.py: rank 0 trains what is missing, the other ranks wait for it

Each run trains in a child process of one rank, its folder under `<work>/base-<stage>` or `<work>/pavrm`; a model's
final export (checkpoints/step_N/model) is then copied into place through a temporary folder and a rename, so a
folder that exists is complete and a waiting rank only has to see it appear."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine.atomic import atomic_directory
from engine.config import BootstrapConfig, RunConfig
from engine.errors import BootstrapError
from engine.train.checkpoint import complete_checkpoints

# Set by the deepspeed launcher for the parent's ranks. Without them a child is a world of one and picks its own
# free MASTER_PORT (engine.distributed.process.init_distributed), so it never joins, or collides with, the parent's
# group.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
                "MASTER_PORT")


def train(runner: str, recipe: str, config: BootstrapConfig, run_dir: Path, overrides: list[str]) -> Path:
    """Run `python -m runners.<runner> --config recipe` on one rank into `run_dir`; returns its final export."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: never resume a checkpoint of another recipe
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    command = [sys.executable, "-m", f"runners.{runner}", "--config", recipe, "--ds_config", config.ds_config,
               f"output_dir={run_dir}", *overrides, *config.overrides]
    if subprocess.run(command, env=env).returncode != 0:
        raise BootstrapError(f"bootstrap: {' '.join(command)} failed")
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    if not checkpoints or not (checkpoints[-1] / "model").is_dir():
        raise BootstrapError(f"bootstrap: {run_dir} holds no exported checkpoint (is train.export off?)")
    return checkpoints[-1] / "model"


def install(export: Path, target: Path) -> None:
    """Copy a trainer's final export into place through a temporary folder and a rename."""
    with atomic_directory(target) as staging:
        shutil.copytree(export, staging, dirs_exist_ok=True)


def bootstrap(config: BootstrapConfig, base: Path, reward: Path, work: Path) -> None:
    """Train whichever of the base generator `base` and its PAVRM `reward` is missing."""
    if not base.exists():
        print(f"{base} missing: training it with runners/sft.py --config {' then '.join(config.base_recipes)} "
              f"(about {config.base_minutes:g} min)", flush=True)
        export = None
        for stage, recipe in enumerate(config.base_recipes):
            export = train("sft", recipe, config, work / f"base-{stage}",
                           [f"model.path={export}"] if export else [])
        install(export, base)
    if not reward.exists():
        print(f"{reward} missing: training it with runners/pavrm.py --config {config.reward_recipe} "
              f"{' '.join(config.reward_overrides)} (about {config.reward_minutes:g} min)", flush=True)
        install(train("pavrm", config.reward_recipe, config, work / "pavrm",
                      [f"model.path={base}", *config.reward_overrides]), reward)


def ensure_assets(config: RunConfig) -> None:
    """Before the process group starts: rank 0 trains the missing `model.path` / `reward.path` (its runs under
    `<output_dir>/bootstrap/`), the other ranks poll for both folders. Nothing collective happens here, so no
    process-group timeout can expire during a long bootstrap; a failing rank 0 is stopped by the launcher, which
    then stops the waiting ranks too."""
    base, reward = Path(config.model.path), Path(config.reward.path)
    if int(os.environ.get("RANK", 0)) == 0:
        bootstrap(config.bootstrap, base, reward, Path(config.output_dir) / "bootstrap")
        return
    deadline = time.monotonic() + 60 * config.bootstrap.wait_minutes
    while not (base.exists() and reward.exists()):
        if time.monotonic() > deadline:
            raise BootstrapError(f"waited bootstrap.wait_minutes={config.bootstrap.wait_minutes:g} for rank 0 to "
                                 f"write {base} and {reward} (on several nodes they must be on a shared filesystem)")
        time.sleep(1)
