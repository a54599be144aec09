"""The main command's error paths, through DeepSpeed's real launcher (its embedded default: test_bootstrap.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_command_without_a_reward_model_says_what_it_needs():
    done = subprocess.run(["deepspeed", "runners/prfl.py", "--config", "configs/tiny.yaml", "--ds_config",
                           "ds_configs/z3_offload.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "reward.path is not set" in done.stderr + done.stdout


def test_runner_rejects_a_bad_override():
    done = subprocess.run([sys.executable, "runners/prfl.py", "sampling.step=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "did you mean sampling.steps" in done.stderr
