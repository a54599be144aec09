"""LoRA for the DiT: peft adapters on linear layers of every block, and LoRA files that other tools load.

    add_lora(model, LoRAConfig(rank=16, alpha=16))      # in place: adapters train, everything else is frozen
    save_lora_export(model.state_dict(), model.config, lora_config, "out/model", "out/lora")
    apply_lora(model, read_lora("out/lora", model), scale=1.0)   # merge an exported LoRA into a plain DiT

peft renames what it wraps: a targeted layer's `blocks.0.self_attn.q.weight` becomes `...q.base_layer.weight`, and
the adapter adds `...q.lora_A.default.weight` (A [r, in]) and `...q.lora_B.default.weight` (B [out, r], zero at
the start); the layer computes W x + b + (alpha / r) B A x. The functions below read such a state dict, from a live
model or consolidated from a ZeRO checkpoint, and write:

- the merged model, W + (alpha / r) B A in the original Wan names (`engine.model.weights.load_dit` loads it);
- `pytorch_lora_weights.safetensors`, diffusers' Wan LoRA layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`,
  `...lora_B.weight`) for `WanPipeline.load_lora_weights` / `WanTransformer3DModel.load_lora_adapter`. The file
  carries no alpha: diffusers (and other readers of this layout) then take alpha = rank, so alpha / r is folded
  into lora_B;
- `lora_wan_original.safetensors`, the original Wan / ComfyUI layout (`diffusion_model.blocks.0.self_attn.q.
  lora_down.weight`, `lora_up.weight` and an `alpha` scalar per layer), which ComfyUI and diffusers' converter for
  non-diffusers Wan LoRAs read;
- `lora_config.json` with rank, alpha and targets.

`read_lora` reads either file back (for sampling a base model with an exported LoRA on top).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.atomic import atomic_directory
from engine.errors import ConfigError
from engine.model.dit import DiT, DiTConfig
from engine.model.weights import save_dit_state

# Layers of a block that can carry LoRA adapters: those that both diffusers' Wan LoRA loader and the original Wan /
# ComfyUI layout name (k_img / v_img only as a pair, i2v only).
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the generator instead of full fine-tuning; see add_lora below."""

    rank: int = 0  # adapter rank r; 0 = LoRA off, every weight of the generator trains
    alpha: float | None = None  # the adapters' update is scaled by alpha / rank; None: alpha = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapters' input; needs memory.checkpointing=false (no mask replay)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS[:8]))  # layers of every block that get
    # adapters (default: q, k, v, o of self- and cross-attention); also cross_attn.k_img + v_img (i2v), ffn.0, ffn.2

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank}: expected 0 (off) or a positive rank")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha}: expected a positive number (or null for alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout}: expected a probability in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets: unknown layer {unknown[0]!r}; expected some of {', '.join(LORA_TARGETS)}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={self.targets}: expected a non-empty list without repeats")
        if ("cross_attn.k_img" in self.targets) != ("cross_attn.v_img" in self.targets):
            raise ConfigError(f"lora.targets={self.targets}: cross_attn.k_img and cross_attn.v_img go together "
                              "(diffusers' Wan LoRA converter reads them only as a pair)")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of the adapters' update B A."""
        return self.effective_alpha / self.rank


ADAPTER = "default"  # peft's adapter name, part of every adapter parameter's name
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
ORIGINAL_FILE = "lora_wan_original.safetensors"
CONFIG_FILE = "lora_config.json"

_ADAPTER_KEY = re.compile(rf"(?P<module>.+)\.lora_(?P<factor>[AB])\.{ADAPTER}\.weight")
_BASE_KEY = re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)")
_DIFFUSERS_FILE_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
_ORIGINAL_FILE_KEY = re.compile(r"diffusion_model\.(?P<module>.+)\.(?P<factor>lora_down\.weight|lora_up\.weight|alpha)")
_ORIGINAL_FACTORS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


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


def merge_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32 on W's device, returned in W's dtype."""
    delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
    return (weight.float() + scale * delta).to(weight.dtype)


def merged_state(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted layer, in the original Wan names."""
    base, adapters = split_lora_state(state)
    for module, (a, b) in adapters.items():
        base[f"{module}.weight"] = merge_weight(base[f"{module}.weight"], a, b, config.scale)
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



def read_lora(path, model: DiT) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapters of a LoRA file in either layout `save_lora_export` writes, as {Wan layer name: (A [r, in],
    B [out, r], alpha / r)}, checked against `model`'s linear layers. `path` is the file, or a folder holding one
    (diffusers' file is taken when both are there: they hold the same adapters)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (DIFFUSERS_FILE, ORIGINAL_FILE) if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"LoRA folder {path} holds neither {DIFFUSERS_FILE} nor {ORIGINAL_FILE}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    from_diffusers = {theirs: wan for wan, theirs in _diffusers_names(list(layers)).items()}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        if m := _DIFFUSERS_FILE_KEY.fullmatch(key):
            module, factor = from_diffusers.get(m["module"]), m["factor"]
        elif m := _ORIGINAL_FILE_KEY.fullmatch(key):
            module, factor = m["module"], _ORIGINAL_FACTORS[m["factor"]]
        else:
            raise ValueError(f"{path}: key {key} is in neither LoRA layout: expected diffusers' "
                             "transformer.<layer>.lora_A/lora_B.weight or the original "
                             "diffusion_model.<layer>.lora_down/lora_up.weight and .alpha")
        if module not in layers:
            raise ValueError(f"{path}: key {key} names no linear layer of this {model.config.model_type} model "
                             f"({model.config.num_layers} blocks)")
        factors.setdefault(module, {})[factor] = value
    adapters = {}
    for module, found in sorted(factors.items()):
        if not {"A", "B"} <= found.keys():
            raise ValueError(f"{path}: layer {module} has {', '.join(sorted(found))} but needs both LoRA factors "
                             "(lora_A/lora_down and lora_B/lora_up)")
        a, b, layer = found["A"], found["B"], layers[module]
        rank = a.shape[0]
        if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
            raise ValueError(f"{path}: layer {module} has factors A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                             f"model's layer needs A [r, {layer.in_features}] and B [{layer.out_features}, r]")
        # diffusers' layout carries no alpha: readers take alpha = rank (our export folds alpha / r into B).
        alpha = found["alpha"].item() if "alpha" in found else rank
        adapters[module] = (a, b, alpha / rank)
    return adapters


def apply_lora(model: DiT, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]], scale: float = 1.0) -> DiT:
    """Merge `read_lora`'s adapters into a plain DiT in place: W + scale * (alpha / r) B A."""
    with torch.no_grad():
        for module, (a, b, layer_scale) in adapters.items():
            weight = model.get_submodule(module).weight
            weight.copy_(merge_weight(weight, a, b, scale * layer_scale))
    return model
