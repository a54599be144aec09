"""runners/sft.py with a SIGKILL injected, for the crash tests in tests/test_engine.py.

    sft_with_fault.py --kill-after-step N ...   dies once step N has finished (between checkpoints)
    sft_with_fault.py --kill-during-save N ...  dies inside the checkpoint of step N, after DeepSpeed has written its
                                                files and before the checkpoint is marked complete
Remaining arguments go to runners/sft.py unchanged.
"""

import argparse
import importlib.util
import os
import signal
from pathlib import Path

import engine.train.trainer as trainer_module
from engine.distributed.process import exit_process

ROOT = Path(__file__).resolve().parents[2]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-during-save", type=int)
    fault, rest = parser.parse_known_args()

    train_step, consolidated_state = trainer_module.Trainer.train_step, trainer_module.consolidated_state

    def train_step_then_die(self, step_fn):
        metrics = train_step(self, step_fn)
        if self.step == fault.kill_after_step:
            die()
        return metrics

    def consolidate_or_die(checkpoint):  # the export's first read of the checkpoint DeepSpeed has just written
        if checkpoint.name == f"step_{fault.kill_during_save:06d}":
            die()
        return consolidated_state(checkpoint)

    trainer_module.Trainer.train_step = train_step_then_die
    if fault.kill_during_save is not None:
        trainer_module.consolidated_state = consolidate_or_die

    spec = importlib.util.spec_from_file_location("sft_runner", ROOT / "runners" / "sft.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner.main(rest)


if __name__ == "__main__":
    exit_process(main())  # like the runners: a DeepSpeed engine's gloo groups can abort the teardown
