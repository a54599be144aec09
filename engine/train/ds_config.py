"""The DeepSpeed config a run uses: the template's "auto" values filled from the run config, the rest checked
against it (errors name the field, the value and what was expected), and the LR schedule."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from engine.config import RunConfig
from engine.distributed.process import Layout
from engine.errors import ConfigError


def resolve_ds_config(template: dict, config: RunConfig, layout: Layout, source: str = "ds_config") -> dict:
    """Fill the run-dependent ("auto") values of a DeepSpeed config from the run config and check the rest.

    Errors name the field, the value and what was expected, before any work is done.
    """
    ds = copy.deepcopy(template)
    train = config.train
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={None if not isinstance(zero, dict) else zero.get('stage')}"
                          ": expected 2 or 3")
    for key, value in (("train_micro_batch_size_per_gpu", train.micro_batch_size),
                       ("gradient_accumulation_steps", train.grad_accum), ("gradient_clipping", train.grad_clip)):
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{source}: {key}={given!r} disagrees with the run config ({value}); use \"auto\"")
        ds[key] = value
    global_batch = train.micro_batch_size * train.grad_accum * layout.dp_size
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(f"{source}: train_batch_size={ds['train_batch_size']!r}, but micro batch "
                          f"{train.micro_batch_size} x accumulation {train.grad_accum} x {layout.dp_size} "
                          f"data-parallel groups = {global_batch}; use \"auto\"")
    ds["train_batch_size"] = global_batch

    bf16 = train.precision == "bf16" or (train.precision == "auto" and torch.cuda.is_available())
    if bf16 and not torch.cuda.is_available():
        raise ConfigError("train.precision=bf16 needs a GPU; use auto or fp32 on a CPU")
    if ds.get("bf16", {}).get("enabled", "auto") not in ("auto", bf16):
        raise ConfigError(f"{source}: bf16.enabled={ds['bf16']['enabled']!r} contradicts train.precision="
                          f"{train.precision}; use \"auto\"")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{source}: fp16.enabled=true: fp16 is not supported, Wan trains in bf16")

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if optimizer.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"{source}: optimizer.type={optimizer.get('type')!r}: expected AdamW")
    params = optimizer.setdefault("params", {})
    for key, value in (("lr", train.lr), ("betas", list(train.betas)), ("weight_decay", train.weight_decay)):
        if params.get(key, "auto") == "auto":
            params[key] = value
    if layout.sp_size > 1 and zero["stage"] == 3:
        # DeepSpeed's ZeRO-3 reduce-scatter path averages gradients over every rank, sequence-parallel replicas
        # included, which divides them by sp_size; its contiguous all-reduce path sums over a sequence-parallel
        # group and averages over data-parallel groups, as it should.
        if zero.get("reduce_scatter") is True:
            raise ConfigError(f"{source}: zero_optimization.reduce_scatter=true scales ZeRO-3 gradients by "
                              f"1/sp_size under sequence parallelism (parallel.sp_size={layout.sp_size}); remove it")
        zero.update(reduce_scatter=False, contiguous_gradients=True)
    if "scheduler" in ds:
        raise ConfigError(f"{source}: scheduler: the LR schedule comes from the run config (train.schedule, "
                          "train.warmup_steps); remove it from the DeepSpeed config")
    return ds


def lr_lambda(config: RunConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero over the remaining steps."""
    train = config.train

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
