"""Per-rank peak memory of PRFL and RGB ReFL training steps at scale, from a trace of the real step on fake tensors.

    python benchmarks/memory_model.py            # Wan2.1-14B, 720P x 81 frames, 8 ranks, sp_size 8, ZeRO-3 (CPU)
    python benchmarks/memory_model.py --smoke    # tiny model and shapes (checks the script; not a report)
    python benchmarks/memory_model.py --preset wan2.1-t2v-1.3b --latent 21 60 104 --world 1 --sp 1   # one GPU

Each case runs the real step object (`PRFLWithSFTStep` around `PRFLStep` or `RGBReFLStep`, SFT weight 1) and its
backward on the real models under torch's FakeTensorMode: shapes, dtypes and storages without data or compute. The
ranks are a fake process group (torch's `fake` backend, collectives without data), so Ulysses sequence parallelism
runs its real code: this process is rank 0 of `--world`, its tokens are one `--sp`-th of the sequence and DeepSpeed's
all-to-alls produce their real buffers. A TorchDispatchMode records every storage the step allocates and frees, and
keeps the peak of what is live at once on the device, with what it was made of:

- activations: tensors autograd saved for backward (saved-tensor hooks) and the checkpointed block inputs. One
  trace gives both settings: without activation offload the block inputs stay on the device; with it each waits on
  the host from its parking until it is prefetched, one block ahead of its recomputation (engine/offload.py's
  schedule on a GPU);
- temporaries: every other live tensor (outputs, intermediate results, gradients of activations, the one
  parameter gradient in flight: ZeRO-3 reduce-scatters and frees each as it is produced, so the trace drops
  parameter gradients once accumulated). Tensors kept by torch.utils.checkpoint closures (the VAE frames'
  causal caches, the reward models' layer inputs) count here.

Parameters are not traced: the generator's model states follow ZeRO-3 partitioning over `--world` ranks (DeepSpeed's
own estimate, `estimate_zero3_model_states_mem_needs`, with optimizer offload as the DeepSpeed config says), plus a
bound on the parameters ZeRO-3 gathers at once (`stage3_max_live_parameters` bf16 values). The frozen models (PAVRM,
VAE, pixel reward models) are replicated on every rank in bf16 and counted whole. The rollout uses 2 sampling steps
with k = 1: a no-gradient rollout keeps nothing from one step to the next, so its peak does not depend on k.

What the trace cannot see: allocator fragmentation and caching (reserved > allocated), NCCL and DeepSpeed buffers,
CUDA context and kernels' workspaces (flash attention, cuBLAS). Compare with `torch.cuda.max_memory_allocated`
(benchmarks/step_memory_speed.py) on a GPU run of the same case.
Writes benchmarks/results/memory_model-<preset>-<F>x<H>x<W>-w<world>sp<sp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import weakref
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.prfl  # noqa: E402
from engine.config import RGBReFLConfig, load_config  # noqa: E402
from engine.data import SampleRandomness  # noqa: E402
from engine.dit import DiT, DiTConfig  # noqa: E402
from engine.flow import make_scheduler  # noqa: E402
from engine.offload import BlockInputStore, apply_activation_checkpointing  # noqa: E402
from engine.parallel import apply_ulysses  # noqa: E402
from engine.prfl import PRFLStep, PRFLWithSFTStep  # noqa: E402
from engine.refl_rgb import TINY_CLIP, TINY_PIXELS, TINY_QWEN2_VL, TINY_VAE, build_rgb_refl_step  # noqa: E402
from engine.reward import RewardModel, RewardModelConfig  # noqa: E402
from engine.sft import SFTStep  # noqa: E402

GB = 2**30
DEVICE = "cpu"  # fake tensors on the CPU stand for the GPU
METHODS = {"prfl": "PRFL, reward trunk left whole for comparison (full sequence on every rank, no checkpointing)",
           "prfl_sp": "PRFL, reward trunk sequence-parallel and block-checkpointed like the generator, as "
                      "runners/prfl.py runs it (Trainer.distribute)",
           "rgb_first": "RGB ReFL, first frame (Wan VAE + CLIP ViT-H/14 image reward)",
           "rgb_all": "RGB ReFL, all frames (Wan VAE + Qwen2-VL-2B video reward)"}
SMOKE = dict(preset="tiny", latent=(5, 8, 12), world=2, sp=2, text_tokens=16, reward_blocks=1, vae_config=TINY_VAE,
             clip=TINY_CLIP, qwen=TINY_QWEN2_VL, min_pixels=TINY_PIXELS[0], max_pixels=TINY_PIXELS[1])


class LiveMemory(TorchDispatchMode):
    """Bytes of the storages alive at once on the device, and the peak with its make-up and phase, for both
    settings at once: `resident` (block inputs stay on the device) and `offload` (a parked block input waits on
    the host from parking until it is prefetched, `parked` bytes)."""

    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.ignored = ignored  # storages not traced: parameters
        self.live: dict[int, int] = {}
        self.kept: set[int] = set()  # storages held for backward (saved tensors, parked block inputs)
        self.current = self.kept_bytes = self.parked = self.host = self.host_peak = 0
        self.phase = "setup"
        self.peaks = {"resident": {"total": 0}, "offload": {"total": 0}}

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key)
        self.current -= nbytes
        if key in self.kept:
            self.kept.discard(key)
            self.kept_bytes -= nbytes

    def unpark(self, nbytes: int) -> None:
        self.parked -= nbytes

    def update(self) -> None:
        for name, total, kept in (("resident", self.current, self.kept_bytes),
                                  ("offload", self.current - self.parked, self.kept_bytes - self.parked)):
            if total > self.peaks[name]["total"]:
                self.peaks[name] = {"total": total, "activations": kept, "temporaries": total - kept,
                                    "phase": self.phase}
        self.host_peak = max(self.host_peak, self.host)

    def track(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live and key not in self.ignored:
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
            self.update()
        return key

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark a tensor as held for backward (it stays in `live` as long as its storage does)."""
        key = self.track(tensor)
        if key in self.live and key not in self.kept:
            self.kept.add(key)
            self.kept_bytes += self.live[key]
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


class TracedStore(BlockInputStore):
    """engine/offload.py's store as it behaves on a GPU, for both settings in one trace: a parked block input is an
    activation on the device; with offload its copy waits on the host and the device holds nothing of it until
    it is prefetched, one block ahead of its recomputation (then it is back on the device)."""

    def __init__(self, memory: LiveMemory) -> None:
        super().__init__(False)
        self.memory = memory
        self.sizes: dict[int, tuple[int, int]] = {}  # slot -> (device bytes offload frees, bytes of the host copy)

    def park(self, x: torch.Tensor) -> int:
        key = self.memory.track(self.memory.keep(x))
        slot_id = super().park(x)
        # the device frees the whole storage x views; the host copy holds x's own elements
        self.sizes[slot_id] = self.memory.live[key], x.numel() * x.element_size()
        self.memory.parked += self.sizes[slot_id][0]
        self.memory.host += self.sizes[slot_id][1]
        self.memory.update()
        return slot_id

    def prefetch(self, slot_id: int) -> None:
        if slot_id in self.sizes:
            device_bytes, host_bytes = self.sizes.pop(slot_id)
            self.memory.parked -= host_bytes  # the copy that comes back
            self.memory.host -= host_bytes
            if device_bytes > host_bytes:  # the rest of a viewed storage never returns: uncount it when it dies
                weakref.finalize(self.slots[slot_id].tensor.untyped_storage(), self.memory.unpark,
                                 device_bytes - host_bytes)
            self.memory.update()

    def fetch(self, slot_id: int) -> torch.Tensor:
        self.prefetch(slot_id)
        return self.slots.pop(slot_id).tensor


def to_fake(module: nn.Module) -> nn.Module:
    """Replace a meta-device module's parameters and buffers by fake CPU tensors in place (module.to() cannot
    convert to fake tensors: it swaps parameters, which fake tensors refuse)."""
    for submodule in module.modules():
        for tensors in (submodule._parameters, submodule._buffers):
            for name, tensor in list(tensors.items()):
                if tensor is not None:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=DEVICE)
                    tensors[name] = nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                        else fake
    return module


def real_scheduler(*args, **kwargs):
    """engine.flow.make_scheduler outside the fake mode: diffusers keeps its sigma tables as real tensors; the chain
    starts at step 0, so the step index needs no lookup by value (a data-dependent op fake tensors cannot run)."""
    with unset_fake_temporarily():
        scheduler = make_scheduler(*args, **kwargs)
    scheduler.set_begin_index(0)
    return scheduler


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def init_fake_ranks(world: int, sp: int):
    """Rank 0 of a fake `world`-rank process group, DeepSpeed's comm on top, and its sequence-parallel group."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    if sp == 1:
        return None
    parallel_state_sp.initialize_sequence_parallel(sp)
    return parallel_state_sp.get_sequence_parallel_group()


def trace_case(args, method: str, group) -> dict:
    """Trace one step of `method`: its traced peaks (bytes) without and with activation offload, the host bytes
    offload needs, the frozen models' size and the generator (for its model states)."""
    run = load_config(None, ["sampling.steps=2", "sampling.solver=unipc", "prfl.sft_weight=1.0"])
    dtype = torch.bfloat16
    dit_config = DiTConfig.preset(args.preset)
    with torch.device("meta"):
        model = DiT(dit_config).to(dtype)
        frozen: list[nn.Module] = []
        if method.startswith("prfl"):
            blocks = min(args.reward_blocks, dit_config.num_layers)
            reward = RewardModel(RewardModelConfig(blocks=blocks), DiT(DiTConfig.preset(args.preset, num_layers=blocks))
                                 .to(dtype)).requires_grad_(False).eval()
            step = PRFLStep(run.prfl, run.sampling, reward, step_override=1)
            frozen.append(reward)
        else:
            frames = method.removeprefix("rgb_")
            rgb = RGBReFLConfig(frames=frames, random_weights=True, vae_config=args.vae_config,
                                reward_config=args.clip if frames == "first" else args.qwen,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
            step = build_rgb_refl_step(run, rgb, "meta", dtype)
            step.step_override = 1  # k = 1 of 2: the rollout's peak does not depend on k
            frozen += [step.vae.model, step.reward_model]
    if method == "rgb_all":  # the video model's token layout is integer bookkeeping: computed for real, once
        f, h, w = args.latent
        _, _, grid = step.reward_model.sizes(4 * (f - 1) + 1, 8 * h, 8 * w)
        step.reward_model.layout(1, grid, torch.device(DEVICE))
    # Tensors made from Python values (token ids, Qwen2-VL's patch grid) stay real constants up to this many
    # elements, so that the data-dependent index arithmetic of transformers' Qwen2-VL runs on real values.
    constants = mock.patch.object(fake_tensor, "CONSTANT_NUMEL_LIMIT", 1 << 16)
    with FakeTensorMode(allow_non_fake_inputs=True), constants, \
            mock.patch.object(engine.prfl, "make_scheduler", real_scheduler):
        for module in (model, *frozen):
            to_fake(module)
        memory = LiveMemory({p.untyped_storage()._cdata for m in (model, *frozen) for p in m.parameters()})
        if group is not None:
            apply_ulysses(model, group)
        apply_activation_checkpointing(model, store=TracedStore(memory))
        if method == "prfl_sp":
            if group is not None:
                apply_ulysses(step.reward_model.trunk, group)
            apply_activation_checkpointing(step.reward_model.trunk, store=TracedStore(memory))
        for p in model.parameters():  # ZeRO-3 reduce-scatters each gradient and frees it
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        null_context = torch.zeros(1, dit_config.text_dim)
        full = PRFLWithSFTStep(step, SFTStep(run.sft, null_context), run.prfl.sft_weight)
        batch = {"latents": torch.zeros(1, dit_config.out_dim, *args.latent),
                 "context": torch.zeros(1, args.text_tokens, dit_config.text_dim)}
        phased = {name: getattr(step, name) for name in ("rollout", "reward")}

        def entering(name):
            def wrapped(*a, **k):
                memory.phase = name
                result = phased[name](*a, **k)
                memory.phase = "gradient step" if name == "rollout" else memory.phase
                return result
            return wrapped

        step.rollout, step.reward = entering("rollout"), entering("reward")
        with memory, torch.autograd.graph.saved_tensors_hooks(memory.keep, lambda t: t):
            loss, _ = full(model, batch, SampleRandomness(0, [0]))
            memory.phase = "backward"
            loss.backward()
    return {"peaks": memory.peaks, "host_peak": memory.host_peak,
            "frozen_bytes": sum(parameter_bytes(m) for m in frozen), "dit": model}


def model_states(dit: nn.Module, ds_config: dict, world: int) -> dict:
    """The generator's ZeRO-3 model states on one rank, by DeepSpeed's own estimate, and the gathered-parameter
    bound."""
    from engine.trainer import zero3_model_states

    zero = ds_config["zero_optimization"]
    total = sum(p.numel() for p in dit.parameters())
    offload_optimizer = zero.get("offload_optimizer", {}).get("device") == "cpu"
    offload_params = zero.get("offload_param", {}).get("device") == "cpu"
    _, gpu, largest_layer = zero3_model_states(dit, zero, gpus_per_node=world)
    parameters = 0 if offload_params else 2 * total / world
    optimizer = 0 if offload_optimizer else 16 * total / world  # fp32 master, Adam m and v, fp32 gradient partition
    # Gathered full parameters: at most stage3_max_live_parameters bf16 values, at least DeepSpeed's largest layer.
    gathered = max(largest_layer, 2 * min(total, int(zero.get("stage3_max_live_parameters", 1e9))))
    return {"parameters_total": total, "zero3_estimate": gpu, "parameters": parameters,
            "gradients_and_optimizer": optimizer, "gathered": gathered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-14b")
    parser.add_argument("--latent", type=int, nargs=3, default=(21, 90, 160), metavar=("F", "H", "W"),
                        help="latent frames, height, width (720P x 81 frames: 21 90 160; 480P: 21 60 104)")
    parser.add_argument("--world", type=int, default=8, help="ranks (ZeRO-3 partitions over all of them)")
    parser.add_argument("--sp", type=int, default=8, help="Ulysses sequence-parallel degree")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--reward-blocks", type=int, default=8, help="PAVRM trunk depth K")
    parser.add_argument("--ds-config", default="ds_configs/z3_offload.json")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes; writes to a temporary folder")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    args = parser.parse_args()
    args.vae_config, args.clip, args.qwen = {}, {}, {}
    args.min_pixels, args.max_pixels = RGBReFLConfig.min_pixels, RGBReFLConfig.max_pixels
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results")
    ds_config = json.loads((ROOT / args.ds_config).read_text())
    started = time.perf_counter()
    group = init_fake_ranks(args.world, args.sp)
    rows = []
    for method in args.methods:
        case_started = time.perf_counter()
        traced = trace_case(args, method, group)
        states = model_states(traced.pop("dit"), ds_config, args.world)
        for offload in (False, True):
            peak = traced["peaks"]["offload" if offload else "resident"]
            total = (states["parameters"] + states["gradients_and_optimizer"] + states["gathered"]
                     + traced["frozen_bytes"] + peak["total"])
            rows.append({"method": method, "activation_offload": offload, "phase_of_peak": peak["phase"],
                         "parameters_gb": states["parameters"] / GB,
                         "gradients_and_optimizer_gb": states["gradients_and_optimizer"] / GB,
                         "zero3_gathered_gb": states["gathered"] / GB,
                         "frozen_models_gb": traced["frozen_bytes"] / GB,
                         "activations_gb": peak["activations"] / GB, "temporaries_gb": peak["temporaries"] / GB,
                         "total_gb": total / GB,
                         "host_activations_gb": traced["host_peak"] / GB if offload else 0.0,
                         "trace_s": time.perf_counter() - case_started})
            print(json.dumps(rows[-1]), flush=True)
    tokens = math.prod(s // p for s, p in zip(args.latent, DiTConfig.preset(args.preset).patch_size))
    report = {"preset": args.preset, "latent": list(args.latent), "tokens": tokens, "world": args.world,
              "sp": args.sp, "tokens_per_rank": math.ceil(tokens / args.sp), "text_tokens": args.text_tokens,
              "ds_config": args.ds_config, "precision": "bf16", "micro_batch": 1, "sft_weight": 1.0,
              "generator_parameters": states["parameters_total"],
              "deepspeed_zero3_model_states_estimate_gb": states["zero3_estimate"] / GB,
              "torch": torch.__version__, "methods": {m: METHODS[m] for m in args.methods}, "smoke": args.smoke,
              "runtime_s": time.perf_counter() - started, "rows": rows}
    f, h, w = args.latent
    stem = out_dir / f"memory_model-{args.preset}-{f}x{h}x{w}-w{args.world}sp{args.sp}"  # the preset has dots
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    columns = ["parameters_gb", "gradients_and_optimizer_gb", "zero3_gathered_gb", "frozen_models_gb",
               "activations_gb", "temporaries_gb", "total_gb", "host_activations_gb"]
    lines = [f"# Modelled peak memory per rank: {args.preset}, latent {f}x{h}x{w} ({tokens:,} tokens), "
             f"{args.world} ranks, sp {args.sp}", "",
             f"Traced on fake tensors (torch {torch.__version__}), {args.ds_config}, bf16, micro-batch 1, SFT loss "
             f"on, {args.text_tokens} text tokens. Model states: DeepSpeed's ZeRO-3 partitioning of "
             f"{states['parameters_total'] / 1e9:.2f} B generator parameters over {args.world} ranks; activations "
             "and temporaries: the traced peak of live tensors. GB = 2^30 bytes. Not included: allocator "
             "fragmentation, communication buffers, CUDA context, kernel workspaces.", "",
             "| method | activation offload | params | grads + optimizer | ZeRO-3 gathered | frozen models | "
             "activations | temporaries | **total** | on host | peak in |", "|---|---|" + "---|" * 9]
    lines += [f"| {r['method']} | {'on' if r['activation_offload'] else 'off'} | "
              + " | ".join(f"{r[c]:.2f}" if c != "total_gb" else f"**{r[c]:.2f}**" for c in columns)
              + f" | {r['phase_of_peak']} |" for r in rows]
    lines += ["", *[f"- `{m}`: {METHODS[m]}" for m in args.methods]]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md in {report['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
