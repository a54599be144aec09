"""Exponential moving average (EMA) of the trained weights, kept by each rank on the fp32 master shards it owns.

    ema = model_ema(model, decay=0.999, start=0, device=host)   # after deepspeed.initialize; None when decay is 0
    ema.update(step)                                             # after every optimizer step
    ema.save(checkpoint / "ema", rank)                           # each rank its own file
    ema.load(checkpoint / "ema", rank)                           # resume, on the same or another number of ranks
    consolidate(checkpoint / "ema")                              # {name: full fp32 tensor}, from the rank files

The EMA follows the optimizer's fp32 master weights, not the (bf16) module weights, and is never gathered while
training: under ZeRO-3 a rank holds the partition of every parameter that DeepSpeed gives it (`param.ds_tensor`),
under ZeRO-2 the fragments of parameters that fall in its slice of the flat fp32 partition. A shard is the pair
(offset into the flattened parameter, values), so the rank files of a checkpoint together cover every trainable
parameter exactly once, whatever the stage or the number of ranks, and consolidation needs no DeepSpeed.

Rule, with w_n the weights after optimizer step n and w_0 the weights the run starts from:
    ema_0 = w_0;   ema_n = w_n for n <= start;   ema_n = decay * ema_{n-1} + (1 - decay) * w_n after that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from engine.atomic import atomic_file

Shards = dict[str, tuple[int, torch.Tensor]]  # parameter name -> (offset into the flattened parameter, values)


def master_shards(model: torch.nn.Module) -> Shards:
    """The fp32 master weights this rank's ZeRO optimizer holds, per trainable parameter of `model`."""
    import deepspeed.comm as ds_dist
    from deepspeed.utils import safe_get_local_fp32_param

    shards = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: partitions of ds_tensor.ds_numel elements in rank order, last padded
            size = param.ds_tensor.ds_numel
            offset = size * ds_dist.get_rank(group=param.ds_process_group)
            length = max(0, min(size, param.ds_numel - offset))
            if length:  # DeepSpeed hands the shard over on the accelerator (a copy when the optimizer is offloaded)
                shards[name] = (offset, safe_get_local_fp32_param(param)[:length])
        elif getattr(param, "_hp_mapping", None) is not None:
            # ZeRO-2 has no public getter for a rank's own fragment (safe_get_full_fp32_param all-reduces the
            # whole parameter); this is the mapping that getter reads.
            mapping = param._hp_mapping
            shards[name] = (mapping.lp_fragment_address.start, mapping.get_hp_fragment())
    return shards


def full_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The unpartitioned shape of every trainable parameter (ZeRO-3 leaves an empty tensor in the module)."""
    return {name: getattr(p, "ds_shape", p.shape) for name, p in model.named_parameters() if p.requires_grad}


class ShardedEMA:
    """The EMA of the shards `read()` returns (the same names and offsets on every call), in fp32 on `device`."""

    def __init__(self, read: Callable[[], Shards], shapes: dict[str, torch.Size], decay: float, start: int,
                 device: torch.device) -> None:
        self.read, self.shapes, self.decay, self.start, self.device = read, shapes, decay, start, device
        self.restart()

    def restart(self) -> None:
        """Start over from the current weights."""
        self.shards = {name: (offset, values.detach().to(self.device, torch.float32, copy=True))
                       for name, (offset, values) in self.read().items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (counted from 1)."""
        for name, (_, values) in self.read().items():
            ema = self.shards[name][1]
            if step <= self.start:
                ema.copy_(values)
            else:
                ema.lerp_(values.to(ema.device, torch.float32), 1.0 - self.decay)

    def save(self, folder: Path, rank: int) -> None:
        """Write this rank's shards to `folder/rank_NNNNN.pt` (through a temporary name)."""
        record = {"shapes": {name: tuple(shape) for name, shape in self.shapes.items()},
                  "shards": {name: (offset, values.cpu()) for name, (offset, values) in self.shards.items()}}
        with atomic_file(Path(folder) / f"rank_{rank:05d}.pt") as staging:
            torch.save(record, staging)

    def load(self, folder: Path, rank: int) -> bool:
        """Restore the EMA saved in `folder`; False (and a restart from the current weights) if there is none.

        A rank reads its own file when the checkpoint was saved with the same partitioning, otherwise (another
        number of ranks, a universal checkpoint) it takes its shards' elements from every rank file."""
        files = sorted(Path(folder).glob("rank_*.pt"))
        if not files:
            self.restart()
            return False
        own = Path(folder) / f"rank_{rank:05d}.pt"
        if own.exists():
            saved = _read(own)["shards"]
            if {n: (o, v.numel()) for n, (o, v) in saved.items()} == \
                    {n: (o, v.numel()) for n, (o, v) in self.shards.items()}:
                for name, (_, values) in self.shards.items():
                    values.copy_(saved[name][1])
                return True
        copied = {name: 0 for name in self.shards}
        for file in files:
            for name, (offset, values) in _read(file)["shards"].items():
                if name in self.shards:
                    copied[name] += _copy_overlap(*self.shards[name], offset, values)
        for name, (_, values) in self.shards.items():
            if copied[name] != values.numel():
                raise ValueError(f"{folder}: the EMA rank files cover {copied[name]} of this rank's "
                                 f"{values.numel()} elements of {name}; is a rank file missing?")
        return True


def model_ema(model: torch.nn.Module, decay: float, start: int, device: torch.device) -> ShardedEMA | None:
    """The EMA of `model`'s trainable parameters inside a ZeRO-2/3 engine, or None when `decay` is 0 (off)."""
    if not decay:
        return None
    return ShardedEMA(lambda: master_shards(model), full_shapes(model), decay, start, device)


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 EMA of every trainable parameter, assembled on the CPU from the rank files in `folder`."""
    files = sorted(Path(folder).glob("rank_*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no EMA rank files (rank_*.pt)")
    full: dict[str, torch.Tensor] = {}
    for file in files:
        record = _read(file)
        if not full:  # every rank file names every parameter's shape
            full = {name: torch.empty(shape, dtype=torch.float32) for name, shape in record["shapes"].items()}
            filled = dict.fromkeys(full, 0)
        for name, (offset, values) in record["shards"].items():
            filled[name] += _copy_overlap(0, full[name].view(-1), offset, values)
    for name, tensor in full.items():
        if filled[name] != tensor.numel():
            raise ValueError(f"{folder}: the EMA rank files cover {filled[name]} of the {tensor.numel()} elements "
                             f"of {name}; is a rank file missing?")
    return full


def _read(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


def _copy_overlap(dst_offset: int, dst: torch.Tensor, src_offset: int, src: torch.Tensor) -> int:
    """Copy the elements two flat slices of one parameter share into `dst`; returns how many."""
    start, end = max(dst_offset, src_offset), min(dst_offset + dst.numel(), src_offset + src.numel())
    if start >= end:
        return 0
    dst[start - dst_offset:end - dst_offset].copy_(src[start - src_offset:end - src_offset])
    return end - start
