"""What a run will need before it starts: DeepSpeed's estimate of the ZeRO-3 model states and the dry run, which
checks the configs and the data against the model on the meta device and estimates memory."""

from __future__ import annotations

import math
import os

import torch

from engine.config import RunConfig
from engine.distributed.process import Layout
from engine.errors import ConfigError
from engine.train.ds_config import resolve_ds_config
from engine.train.specs import GeneratorSpec, ModelSpec


def zero3_model_states(model: torch.nn.Module, zero: dict, gpus_per_node: int, num_nodes: int = 1):
    """DeepSpeed's own estimate of a model's ZeRO-3 states, offload as the `zero_optimization` section says:
    (host bytes, device bytes per GPU, largest layer's parameter count)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
        cpu_offload=zero.get("offload_optimizer", {}).get("device") == "cpu",
        cpu_offload_params=zero.get("offload_param", {}).get("device") == "cpu")


def dry_run(config: RunConfig, ds_template: dict, spec: ModelSpec | None = None, dataset=None,
            frozen: torch.nn.Module | None = None) -> dict:
    """Check config, DeepSpeed config and data against the trained model (`spec`, default the run's generator) built
    on the meta device, and estimate memory.

    `frozen`: a model that runs beside it as `Trainer.distribute` runs it (PRFL's reward trunk), on the meta device:
    its parameters (replicated, in the run's precision) and block checkpoints are estimated too. The spec's
    `forwards_per_sample` counts the evaluations a sample makes with gradients (BT scores both videos of a pair).
    Nothing is trained and no engine is built; the world size comes from the launcher's environment.
    """
    spec = spec or GeneratorSpec(config)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout(int(os.environ.get("RANK", 0)), world, config.parallel.sp_size)
    ds = resolve_ds_config(ds_template, config, layout)
    model = spec.meta_model()
    dit_config = spec.transformer(model).config
    if dit_config.num_heads % layout.sp_size:
        raise ConfigError(f"parallel.sp_size={layout.sp_size} must divide the model's {dit_config.num_heads} heads")
    dataset = dataset or spec.dataset(dit_config)
    sample = dataset[0]
    inputs = {k: v.unsqueeze(0).to("meta") for k, v in sample.items()}
    try:  # shape checks only: meta tensors carry no data
        model(inputs["latents"], torch.zeros(1, device="meta"), inputs["context"], clip_fea=inputs.get("clip_fea"),
              y=inputs.get("y"))
    except ValueError as e:
        raise ConfigError(f"data sample 0 does not fit the model: {e}") from None
    frames, height, width = sample["latents"].shape[1:]
    tokens = math.prod(s // p for s, p in zip((frames, height, width), dit_config.patch_size))

    zero = ds["zero_optimization"]
    total = sum(p.numel() for p in model.parameters())
    host_states, gpu_states, _ = zero3_model_states(
        model, zero, gpus_per_node=min(world, max(1, torch.cuda.device_count())),
        num_nodes=max(1, world // max(1, torch.cuda.device_count())))
    # fp32 residual stream kept at each block boundary (checkpointing) for one micro-batch.
    boundary = 4 * config.train.micro_batch_size * spec.forwards_per_sample * math.ceil(tokens / layout.sp_size) * \
        dit_config.dim
    activations = boundary * dit_config.num_layers if config.memory.checkpointing else None
    report = {
        "world_size": world, "sp_size": layout.sp_size, "dp_size": layout.dp_size, "zero_stage": zero["stage"],
        "precision": "bf16" if ds["bf16"]["enabled"] else "fp32", "parameters": total, "tokens": tokens,
        "tokens_per_rank": math.ceil(tokens / layout.sp_size), "samples": len(dataset),
        "model_states_gpu_gb": gpu_states / 2**30, "model_states_host_gb": host_states / 2**30,
        "block_checkpoints_gb": None if activations is None else activations / 2**30,
        "block_checkpoints_on": "host" if config.memory.offload else "device",
    }
    if frozen is not None:
        size = 2 if ds["bf16"]["enabled"] else 4
        trunk = getattr(frozen, "trunk", frozen)
        report["frozen_parameters"] = sum(p.numel() for p in frozen.parameters())
        report["frozen_models_gb"] = size * report["frozen_parameters"] / 2**30
        report["frozen_block_checkpoints_gb"] = (None if activations is None else
                                                 boundary * trunk.config.num_layers / 2**30)
    return {**report, **spec.describe(model, dataset)}
