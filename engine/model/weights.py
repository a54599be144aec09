"""DiT checkpoints on disk: original Wan2.1 and diffusers formats in, original Wan2.1 format out.

Accepted inputs:
- an original Wan2.1 folder (`config.json` + one or more `*.safetensors`, with or without an index json), which is
  also what the reference PRFL code writes;
- a single safetensors file (config inferred from the tensor shapes; ComfyUI's `model.diffusion_model.` prefix is
  stripped);
- a diffusers `WanTransformer3DModel` folder (`config.json` + `diffusion_pytorch_model*.safetensors`), whose keys
  are renamed to Wan's on load with the inverse of diffusers' own `convert_wan_transformer_to_diffusers`.

Loading is strict: a missing key, an unexpected key or a wrong shape is an error naming the key (and both shapes).
The model is built on the meta device and the tensors are assigned shard by shard, so no random weights are made.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.atomic import atomic_directory
from engine.errors import CheckpointError
from engine.model.dit import DiT, DiTConfig

WEIGHTS_PREFIX = "diffusion_pytorch_model"  # Wan's own file naming (it saves through diffusers' ModelMixin)
COMFY_PREFIX = "model.diffusion_model."
# Head counts of the released Wan2.1 widths, for single files that come without a config.json.
HEADS_BY_DIM = {1536: 12, 5120: 40}


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _weight_files(path: Path) -> list[Path]:
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file")
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index[0]} lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return files


def _read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = (tuple(f.get_slice(key).get_shape()), file)
    return shapes


def _wan_names_for_diffusers_keys(keys: list[str]) -> dict[str, str]:
    """diffusers key -> Wan key, derived by running diffusers' converter over every name a DiT of this depth has."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    depth = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    with torch.device("meta"):
        names = DiT(DiTConfig.preset("tiny-i2v", num_layers=max(depth, 1))).state_dict().keys()
    return convert_wan_transformer_to_diffusers({name: name for name in names})


def _is_diffusers(keys, raw_config: dict | None) -> bool:
    if raw_config and raw_config.get("_class_name") == "WanTransformer3DModel":
        return True
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def _config_from_diffusers(raw: dict) -> dict:
    if raw.get("pos_embed_seq_len"):
        raise CheckpointError("diffusers config has pos_embed_seq_len (Wan FLF2V): not supported, only t2v and i2v")
    if raw.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise CheckpointError(f"diffusers config qk_norm={raw['qk_norm']!r}: Wan2.1 uses 'rms_norm_across_heads'")
    image = raw.get("added_kv_proj_dim") is not None
    return dict(
        model_type="i2v" if image else "t2v", patch_size=raw.get("patch_size", (1, 2, 2)),
        in_dim=raw["in_channels"], out_dim=raw.get("out_channels") or raw["in_channels"],
        dim=raw["num_attention_heads"] * raw["attention_head_dim"], num_heads=raw["num_attention_heads"],
        ffn_dim=raw["ffn_dim"], freq_dim=raw.get("freq_dim", 256), text_dim=raw.get("text_dim", 4096),
        num_layers=raw["num_layers"], cross_attn_norm=raw.get("cross_attn_norm", True),
        qk_norm=raw.get("qk_norm") is not None, eps=raw.get("eps", 1e-6),
        **({"clip_dim": raw["image_dim"]} if image else {}),
    )


def _config_from_wan(raw: dict, source: Path) -> dict:
    fields = {f.name for f in dataclasses.fields(DiTConfig)} - set(DiTConfig.RUNTIME_FIELDS)
    window = raw.get("window_size", (-1, -1))
    if tuple(window) != (-1, -1):
        raise CheckpointError(f"{source}: window_size={window} (local attention) is not supported; expected [-1, -1]")
    unknown = [k for k in raw if not k.startswith("_") and k != "window_size" and k not in fields]
    if unknown:
        raise CheckpointError(f"{source}: unknown config field(s) {', '.join(unknown)}; expected some of "
                              f"{', '.join(sorted(fields))}")
    return {k: v for k, v in raw.items() if k in fields}


def _config_from_shapes(shapes: dict[str, tuple], source: Path) -> dict:
    def shape(key):
        if key not in shapes:
            raise CheckpointError(f"{source}: cannot infer the model config, key {key} is missing; "
                                  "put a config.json next to the weights")
        return shapes[key]

    dim, in_dim, *patch = shape("patch_embedding.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if dim not in HEADS_BY_DIM:
        raise CheckpointError(f"{source}: cannot infer num_heads for dim={dim} (known: {HEADS_BY_DIM}); "
                              "put a config.json next to the weights")
    image = "img_emb.proj.0.weight" in shapes
    return dict(
        model_type="i2v" if image else "t2v", patch_size=tuple(patch), in_dim=in_dim, dim=dim,
        num_heads=HEADS_BY_DIM[dim], out_dim=shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]),
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1], num_layers=max(layers) + 1,
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes, cross_attn_norm="blocks.0.norm3.weight" in shapes,
        **({"clip_dim": shape("img_emb.proj.0.weight")[0]} if image else {}),
    )


def _check_keys(expected: dict[str, torch.Size], found: dict[str, tuple], source: Path, num_layers: int) -> None:
    pruned = re.compile(r"blocks\.(\d+)\.")

    def beyond_depth(key):
        m = pruned.match(key)
        return m is not None and int(m.group(1)) >= num_layers

    missing = [k for k in expected if k not in found]
    if missing:
        k = missing[0]
        raise CheckpointError(f"{source}: missing key {k} (expected shape {tuple(expected[k])}); "
                              f"{len(missing)} key(s) missing in all")
    unexpected = [k for k in found if k not in expected and not beyond_depth(k)]
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{source}: unexpected key {k} (shape {found[k][0]}) that the model does not have; "
                              f"{len(unexpected)} unexpected key(s) in all")
    for k, shape in expected.items():
        if tuple(shape) != found[k][0]:
            raise CheckpointError(f"{source}: key {k} has shape {found[k][0]} in the checkpoint "
                                  f"but {tuple(shape)} in the model")


def _inspect(path: Path, num_layers: int | None, runtime: dict | None = None):
    """Config, weight files, {Wan key: (shape, file)} and {Wan key: stored key} of a checkpoint; reads headers only."""
    files = _weight_files(path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    raw_config = json.loads(config_file.read_text()) if path.is_dir() and config_file.exists() else None
    found = _read_shapes(files)

    renames = {}
    if any(k.startswith(COMFY_PREFIX) for k in found):
        renames = {k: k.removeprefix(COMFY_PREFIX) for k in found}
    if _is_diffusers([renames.get(k, k) for k in found], raw_config):
        wan_names = _wan_names_for_diffusers_keys([renames.get(k, k) for k in found])
        renames = {k: wan_names.get(renames.get(k, k), renames.get(k, k)) for k in found}
        fields = _config_from_diffusers(raw_config) if raw_config else None
    else:
        fields = _config_from_wan(raw_config, config_file) if raw_config else None
    found = {renames.get(k, k): v for k, v in found.items()}
    if fields is None:
        fields = _config_from_shapes({k: v[0] for k, v in found.items()}, path)
    if num_layers is not None:
        if not 1 <= num_layers <= fields["num_layers"]:
            raise CheckpointError(f"num_layers={num_layers}: {path} has {fields['num_layers']} blocks")
        fields["num_layers"] = num_layers
    config = DiTConfig(**fields, **(runtime or {}))
    return config, files, found, {v: k for k, v in renames.items()}


def read_config(path) -> DiTConfig:
    """The architecture of a checkpoint (any accepted format), from its config and tensor headers only."""
    return _inspect(Path(path), None)[0]


def load_dit(path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             num_layers: int | None = None, **runtime) -> DiT:
    """Build a DiT from a checkpoint without materialising random weights.

    Args:
        path: folder or single safetensors file (see the module docstring).
        dtype: dtype of the loaded parameters (None keeps the stored dtypes).
        device: where the parameters go.
        num_layers: build only the first `num_layers` blocks and skip the stored ones after them (the reward
            model's trunk); None builds every block the config names.
        runtime: runtime fields of DiTConfig (attention_backend, kernel_backend).
    """
    path = Path(path)
    config, files, found, inverse = _inspect(path, num_layers, runtime)
    with torch.device("meta"):
        model = DiT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(expected, found, path, config.num_layers)

    for file in files:
        shard = {}
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in (k for k, (_, src) in found.items() if src == file and k in expected):
                tensor = f.get_tensor(inverse.get(key, key))
                shard[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        model.load_state_dict(shard, strict=False, assign=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save_dit_state(state_dict: dict[str, torch.Tensor], config: DiTConfig, directory,
                   max_shard_size: str | int = "5GB") -> None:
    """Write a state dict in original Wan naming: safetensors shards (+ index) and config.json, atomically."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS_PREFIX + "{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    with atomic_directory(directory) as staging:
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state_dict[k] for k in keys}, staging / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (staging / f"{WEIGHTS_PREFIX}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config.to_dict()}, indent=2))


def save_dit(model: DiT, directory, max_shard_size: str | int = "5GB") -> None:
    save_dit_state(model.state_dict(), model.config, directory, max_shard_size)
