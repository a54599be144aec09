"""Processes and their groups: the rank layout, starting torch.distributed with the sequence-parallel groups, logging
from rank 0, and ending a process cleanly.

Ranks form groups of `sp_size` consecutive ranks that share one sample and split its video tokens; the groups are
the data-parallel replicas. ZeRO-3 partitions and reduces over all ranks (DeepSpeed's "sequence data parallel"
group): gradients are summed over a sequence-parallel group and averaged over data-parallel replicas, which is
what `deepspeed.initialize(mpu=...)` does with DeepSpeed's own `parallel_state_sp` groups.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from engine.errors import ConfigError


def log(message: str) -> None:
    """Print on rank 0 only (every rank when no process group is up)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: `sp_size` ranks share a sample, `dp_size` groups see different samples."""

    rank: int = 0
    world_size: int = 1
    sp_size: int = 1

    def __post_init__(self) -> None:
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ConfigError(f"parallel.sp_size={self.sp_size} must divide the world size {self.world_size}")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(sp_size: int = 1):
    """Start torch.distributed (nccl on GPU, gloo on CPU) and the sequence-parallel groups.

    Returns the layout and the `mpu` to hand to `deepspeed.initialize` (None without sequence parallelism).
    """
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if "RANK" not in os.environ:  # started with plain `python`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # A process that exits with its groups alive can die in a thread destructor (gloo: "terminate called without
    # an active exception") or hang there, after its work is done; tear them down first.
    atexit.register(_destroy_process_groups, dist.get_rank())
    layout = Layout(dist.get_rank(), dist.get_world_size(), sp_size)
    if sp_size == 1:
        return layout, None
    parallel_state_sp.initialize_sequence_parallel(sp_size)
    return layout, parallel_state_sp


def exit_process(code: int) -> NoReturn:
    """End a training process that returned normally, skipping the interpreter's teardown.

    DeepSpeed's engine stays reachable until interpreter finalization, and with it the gloo groups' worker threads
    (`destroy_process_group` cannot free a group something still holds). Freeing them in that teardown now and then
    aborts a run whose work is done ("terminate called without an active exception", exit code -6), so the process
    tears down its groups itself, flushes its output and leaves.
    """
    if dist.is_initialized():
        _destroy_process_groups(dist.get_rank())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _destroy_process_groups(rank: int) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    # DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm buffer per rank and never unlinks it: every run would leave
    # them behind until /dev/shm (RAM) is full. The other ranks' mappings outlive the unlink.
    buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                                 f"{os.environ.get('MASTER_PORT')}_{rank}")
    buffer.unlink(missing_ok=True)
