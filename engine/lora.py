"""LoRA for the DiT: peft adapters on linear layers of every block, and LoRA files that other tools load.

    add_lora(model, LoRAConfig(rank=16, alpha=16))      # in place: adapters train, everything else is frozen
    save_lora_export(model.state_dict(), model.config, lora_config, "out/model", "out/lora")

peft renames what it wraps: a targeted layer's `blocks.0.self_attn.q.weight` becomes `...q.base_layer.weight`, and
the adapter adds `...q.lora_A.default.weight` (A [r, in]) and `...q.lora_B.default.weight` (B [out, r], zero at
the start); the layer computes W x + b + (alpha / r) B A x. The functions below read such a state dict, from a live
model or consolidated from a ZeRO checkpoint, and write:

- the merged model, W + (alpha / r) B A in the original Wan names (`DiT.from_pretrained` loads it);
- `pytorch_lora_weights.safetensors`, diffusers' Wan LoRA layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`,
  `...lora_B.weight`) for `WanPipeline.load_lora_weights` / `WanTransformer3DModel.load_lora_adapter`. The file
  carries no alpha: diffusers (and other readers of this layout) then take alpha = rank, so alpha / r is folded
  into lora_B;
- `lora_wan_original.safetensors`, the original Wan / ComfyUI layout (`diffusion_model.blocks.0.self_attn.q.
  lora_down.weight`, `lora_up.weight` and an `alpha` scalar per layer), which ComfyUI and diffusers' converter for
  non-diffusers Wan LoRAs read;
- `lora_config.json` with rank, alpha and targets.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch
from safetensors.torch import save_file

from engine.atomic import atomic_directory
from engine.config import ConfigError, LoRAConfig
from engine.dit import DiT, DiTConfig
from engine.weights import save_dit_state

ADAPTER = "default"  # peft's adapter name, part of every adapter parameter's name
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
ORIGINAL_FILE = "lora_wan_original.safetensors"
CONFIG_FILE = "lora_config.json"

_ADAPTER_KEY = re.compile(rf"(?P<module>.+)\.lora_(?P<factor>[AB])\.{ADAPTER}\.weight")
_BASE_KEY = re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)")


def add_lora(model: DiT, config: LoRAConfig) -> DiT:
    """Freeze `model` and inject peft LoRA layers into `config.targets` of every block (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = dict(model.blocks[0].named_modules())
    for target in config.targets:
        if not isinstance(layers.get(target), torch.nn.Linear):
            raise ConfigError(f"lora.targets: {target} is not a linear layer of this {model.config.model_type} model")
    model.requires_grad_(False)
    pattern = r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in config.targets) + ")"
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.effective_alpha, lora_dropout=config.dropout,
                             target_modules=pattern, bias="none")
    return inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether `model` holds LoRA adapters injected by `add_lora`."""
    return any(_ADAPTER_KEY.fullmatch(name) for name, _ in model.named_parameters())


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(base weights in the original Wan names, {layer name: (A, B)}) of a state dict with peft LoRA layers."""
    base, factors = {}, {}
    for key, value in state.items():
        if m := _ADAPTER_KEY.fullmatch(key):
            factors.setdefault(m["module"], {})[m["factor"]] = value
        elif m := _BASE_KEY.fullmatch(key):
            base[f"{m['module']}.{m['param']}"] = value
        else:
            base[key] = value
    for module, ab in factors.items():
        if ab.keys() != {"A", "B"} or f"{module}.weight" not in base:
            raise ValueError(f"LoRA layer {module}: expected lora_A, lora_B and the base weight in the state dict")
    return base, {module: (ab["A"], ab["B"]) for module, ab in sorted(factors.items())}


def merged_state(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted layer, in the original Wan names."""
    base, adapters = split_lora_state(state)
    for module, (a, b) in adapters.items():
        weight = base[f"{module}.weight"]
        base[f"{module}.weight"] = (weight.float() + config.scale * (b.float() @ a.float())).to(weight.dtype)
    return base


def _diffusers_names(modules: list[str]) -> dict[str, str]:
    """Wan layer name -> diffusers layer name, by diffusers' own Wan checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({f"{m}.weight": m for m in modules})
    return {wan: theirs.removesuffix(".weight") for theirs, wan in converted.items()}


def diffusers_lora_state(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' Wan LoRA layout, alpha / r folded into lora_B."""
    _, adapters = split_lora_state(state)
    names = _diffusers_names(list(adapters))
    out = {}
    for module, (a, b) in adapters.items():
        out[f"transformer.{names[module]}.lora_A.weight"] = a
        out[f"transformer.{names[module]}.lora_B.weight"] = b * config.scale
    return out


def original_lora_state(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters in the original Wan / ComfyUI layout: lora_down (A), lora_up (B) and alpha per layer."""
    _, adapters = split_lora_state(state)
    out = {}
    for module, (a, b) in adapters.items():
        out[f"diffusion_model.{module}.lora_down.weight"] = a
        out[f"diffusion_model.{module}.lora_up.weight"] = b
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(config.effective_alpha, dtype=torch.float32)
    return out


def save_lora_export(state: dict[str, torch.Tensor], dit_config: DiTConfig, config: LoRAConfig, model_dir,
                     lora_dir) -> None:
    """Write the merged model to `model_dir` and the two LoRA files + lora_config.json to `lora_dir`, atomically."""
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    save_dit_state(merged_state(state, config), dit_config, model_dir)
    with atomic_directory(lora_dir) as staging:
        for name, tensors in ((DIFFUSERS_FILE, diffusers_lora_state(state, config)),
                              (ORIGINAL_FILE, original_lora_state(state, config))):
            save_file({k: v.contiguous() for k, v in tensors.items()}, staging / name, metadata={"format": "pt"})
        record = {**dataclasses.asdict(config), "alpha": config.effective_alpha}
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2))

