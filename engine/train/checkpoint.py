"""Checkpoints on disk: which are complete, where a run resumes, the consolidated weights of one, and the commit
that wrote it. A checkpoint is complete once its COMPLETE marker exists, which the trainer writes last."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from engine.errors import ConfigError

COMPLETE = "COMPLETE"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint is finished once its COMPLETE marker exists)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if (p / COMPLETE).exists())


def find_resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: newest complete checkpoint of the run (None if there is none); otherwise a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists() and not (path / "universal").is_dir():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def consolidated_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, consolidated by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
