"""Per-rank peak memory of PRFL and RGB ReFL training steps at scale, from a trace of the real step on fake tensors,
with every term a GPU run adds named: the fit verdict on 80 GB and 141 GB GPUs, and host memory per rank and node.

    python -m benchmarks.memory_model            # Wan2.1-14B, 720P x 81 frames, 8 ranks, sp_size 8, ZeRO-3 (CPU)
    python -m benchmarks.memory_model --smoke    # tiny model and shapes (checks the script; not a report)
    python -m benchmarks.memory_model --preset wan2.1-t2v-1.3b --latent 21 60 104 --world 1 --sp 1   # one GPU
    python -m benchmarks.memory_model --preset wan2.1-i2v-14b     # image-to-video: CLIP tokens, 36 input channels
    python -m benchmarks.memory_model --world 1 --sp 1 --lora-rank 32 --methods prfl_sp rgb_first --sft on off
        --ds-config ds_configs/z3_offload_params.json        # 14B LoRA on one GPU, its base's parameters on the host

Each case runs the real step object (`FeedbackWithSFTStep` around `PRFLStep` or `RGBReFLStep`, SFT weight 1) and its
backward on the real models under torch's FakeTensorMode: shapes, dtypes and storages without data or compute. The
DiT runs the fused Triton kernels' launch code as a GPU does (`--kernels triton`, their launches recorded instead of
run: benchmarks/kernel_launches.py), so the tensors they save for backward are the ones traced. The ranks are a fake
process group (torch's `fake` backend, collectives without data), so Ulysses sequence parallelism runs its real
code: this process is rank 0 of `--world`, its tokens are one `--sp`-th of the sequence and DeepSpeed's all-to-alls
produce their real buffers. A TorchDispatchMode records every storage the step allocates and frees, each rounded as
PyTorch's CUDA allocator rounds it (512 bytes), and keeps the peak of what is live at once on the device:

- activations: tensors autograd saved for backward (saved-tensor hooks) and the checkpointed block inputs. One
  trace gives both settings: without activation offload the block inputs stay on the device; with it each waits on
  the host from its parking until it is prefetched, one block ahead of its recomputation (the schedule of
  engine/distributed/offload.py on a GPU), in a pinned buffer that PyTorch's host allocator rounds up to a power of two;
- temporaries: every other live tensor (outputs, intermediate results, gradients of activations, the one
  parameter gradient in flight: ZeRO-3 reduce-scatters and frees each as it is produced, so the trace drops
  parameter gradients once accumulated). Tensors kept by torch.utils.checkpoint closures (the VAE frames'
  causal caches, the reward models' layer inputs) count here.

Not traced, added by rule (each a named column):
- model states: the generator's parameters (bf16, partitioned over `--world` by ZeRO-3, on the host with
  offload_param, each partition a pinned buffer), and for the trainable ones (all, or LoRA's adapters) the fp32
  master copy, Adam's moments and the fp32 gradient partition: 16 bytes each, on the host with offload_optimizer
  (there the gradients sit in pinned buffers, the whole partition's and each sub-group's, as DeepSpeed 0.19
  allocates them). DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs`, full fine-tuning) is reported
  beside it;
- ZeRO-3 buffers: the gathered parameters (at most `stage3_max_live_parameters` bf16 values, prefetch included, at
  least the largest layer) and the reduce bucket (`reduce_bucket_size` gradient values, bf16, allocated up front with
  contiguous_gradients);
- frozen models (PAVRM, VAE, pixel reward model): replicated on every rank in bf16, counted whole;
- NCCL buffers (an estimate: NCCL_CHANNELS channels x (Simple 4 MiB + LL128 4.7 MiB + LL 0.5 MiB) per ring or tree
  connection of each communicator, plus 2 channels x 4 MiB per peer for the Ulysses all-to-all);
- CUDA context, cuBLAS and flash-attention workspaces (CUDA_CONTEXT_GIB, a typical H100 figure);
- allocator headroom: large blocks held in 2 MiB segments, plus FRAGMENTATION of the traced activations and
  temporaries (an allowance; `python -m benchmarks.gpu_check` measures reserved against allocated).
Everything but the trace is modelled, not measured. Compare with `torch.cuda.max_memory_allocated`
(python -m benchmarks.step_memory_speed, benchmarks.gpu_check) on a GPU run of the same case.
Writes benchmarks/results/memory_model-<preset>-<F>x<H>x<W>-w<world>sp<sp>[-lora<r>][-params-on-host].json and .md
(the last with a DeepSpeed config that offloads the parameters).
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

import engine.steps.feedback
from benchmarks.kernel_launches import recorded_launches
from engine.config import RGBReFLConfig
from engine.config_io import load_config
from engine.distributed.offload import BlockInputStore, apply_activation_checkpointing
from engine.distributed.parallel import apply_ulysses
from engine.model.dit import CLIP_TOKENS, DiT, DiTConfig
from engine.model.flow import make_scheduler
from engine.model.lora import LoRAConfig, add_lora
from engine.model.reward import RewardModel, RewardModelConfig
from engine.steps.feedback import FeedbackWithSFTStep
from engine.steps.prfl import PRFLStep
from engine.steps.rgb_refl import TINY_CLIP, TINY_PIXELS, TINY_QWEN2_VL, TINY_VAE, build_rgb_refl_step
from engine.steps.sft import SFTStep
from engine.train.randomness import SampleRandomness

ROOT = Path(__file__).resolve().parents[1]

GB, MiB = 2**30, 2**20
DEVICE = "cpu"  # fake tensors on the CPU stand for the GPU
GPUS = {"H100 80GB": 81_559 * MiB, "H200": 143_771 * MiB}  # total memory, as nvidia-smi reports it
RANKS_PER_NODE = 8
# NCCL's default buffers of one connection (Simple 4 MiB, LL128 120 x 640 x 8 x 8 B, LL 8 x 512 x 8 x 16 B) and the
# channels an 8-GPU NVLink node typically opens; an estimate (NCCL sizes them at run time).
NCCL_CONNECTION = 4 * MiB + 4_915_200 + 524_288
NCCL_CHANNELS = 32
NCCL_P2P_CHANNELS = 2  # per peer of the all-to-all, 4 MiB each
CUDA_CONTEXT = int(0.75 * GB)  # CUDA context with cuBLAS and flash-attention workspaces on an H100 (typical)
FRAGMENTATION = 0.10  # allowance for blocks the caching allocator cannot reuse, of the traced dynamic peak
METHODS = {"prfl": "PRFL, reward trunk left whole for comparison (full sequence on every rank, no checkpointing)",
           "prfl_sp": "PRFL, reward trunk sequence-parallel and block-checkpointed like the generator, as "
                      "runners/prfl.py runs it (Trainer.distribute)",
           "rgb_first": "RGB ReFL, first frame (Wan VAE + CLIP ViT-H/14 image reward)",
           "rgb_all": "RGB ReFL, all frames (Wan VAE + Qwen2-VL-2B video reward)"}
SMOKE = dict(preset="tiny", latent=(5, 8, 12), world=2, sp=2, text_tokens=16, reward_blocks=1, vae_config=TINY_VAE,
             clip=TINY_CLIP, qwen=TINY_QWEN2_VL, min_pixels=TINY_PIXELS[0], max_pixels=TINY_PIXELS[1])


def allocated_size(nbytes: int) -> int:
    """A block's size as PyTorch's CUDA caching allocator hands it out: a multiple of 512 bytes."""
    return max(512, -(-nbytes // 512) * 512)


def segment_extra(nbytes: int) -> int:
    """What a large block (1 MiB and up) adds by living in a segment rounded up to 2 MiB."""
    return -(-nbytes // (2 * MiB)) * 2 * MiB - nbytes if nbytes >= MiB else 0


def pinned_size(nbytes: int) -> int:
    """A pinned host buffer's size as PyTorch's host allocator hands it out: the next power of two."""
    return 1 << max(0, (nbytes - 1).bit_length())


class LiveMemory(TorchDispatchMode):
    """Bytes of the storages alive at once on the device, and the peak with its make-up and phase, for both
    settings at once: `resident` (block inputs stay on the device) and `offload` (a parked block input waits on
    the host from parking until it is prefetched, `parked` bytes)."""

    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.ignored = ignored  # storages not traced: parameters
        self.live: dict[int, int] = {}  # storage -> bytes as the CUDA allocator rounds them
        self.kept: set[int] = set()  # storages held for backward (saved tensors, parked block inputs)
        self.current = self.kept_bytes = self.parked = self.host = self.host_peak = 0
        self.segment_extra = 0  # what holding the live large blocks in whole 2 MiB segments adds
        self.phase = "setup"
        self.peaks = {"resident": {"total": 0}, "offload": {"total": 0}}

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key)
        self.current -= nbytes
        self.segment_extra -= segment_extra(nbytes)
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
                                    "segment_extra": self.segment_extra, "phase": self.phase}
        self.host_peak = max(self.host_peak, self.host)

    def track(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live and key not in self.ignored:
            nbytes = allocated_size(storage.nbytes())
            self.live[key] = nbytes
            self.current += nbytes
            self.segment_extra += segment_extra(nbytes)
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
    """The store of engine/distributed/offload.py as it behaves on a GPU, for both settings in one trace: a parked
    block input is an activation on the device; with offload its copy waits on the host and the device holds
    nothing of it until it is prefetched, one block ahead of its recomputation (then it is back on the device)."""

    def __init__(self, memory: LiveMemory) -> None:
        super().__init__(False)
        self.memory = memory
        self.sizes: dict[int, tuple[int, int]] = {}  # slot -> (device bytes offload frees, bytes of the host copy)

    def park(self, x: torch.Tensor) -> int:
        key = self.memory.track(self.memory.keep(x))
        slot_id = super().park(x)
        # the device frees the whole storage x views; the host copy holds x's own elements, in a pinned buffer
        self.sizes[slot_id] = self.memory.live[key], x.numel() * x.element_size()
        self.memory.parked += self.sizes[slot_id][0]
        self.memory.host += pinned_size(self.sizes[slot_id][1])
        self.memory.update()
        return slot_id

    def prefetch(self, slot_id: int) -> None:
        if slot_id in self.sizes:
            device_bytes, host_bytes = self.sizes.pop(slot_id)
            self.memory.parked -= host_bytes  # the copy that comes back
            self.memory.host -= pinned_size(host_bytes)
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
    """engine.model.flow.make_scheduler outside the fake mode: diffusers keeps its sigma tables as real tensors; the
    chain starts at step 0, so the step index needs no lookup by value (a data-dependent op fake tensors cannot run)."""
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


def trace_case(args, method: str, sft: str, group) -> dict:
    """Trace one step of `method`: its traced peaks (bytes) without and with activation offload, the host bytes
    offload needs, the frozen models' size and the generator (for its model states)."""
    run = load_config(None, ["sampling.steps=2", "sampling.solver=unipc",
                             f"prfl.sft_weight={1.0 if sft == 'on' else 0.0}"])
    dtype = torch.bfloat16
    dit_config = DiTConfig.preset(args.preset, kernel_backend=args.kernels)
    with torch.device("meta"):
        model = DiT(dit_config).to(dtype)
        if args.lora_rank:
            add_lora(model, LoRAConfig(rank=args.lora_rank))
        frozen: list[nn.Module] = []
        if method.startswith("prfl"):
            blocks = min(args.reward_blocks, dit_config.num_layers)
            trunk = DiT(DiTConfig.preset(args.preset, num_layers=blocks, kernel_backend=args.kernels))
            reward = RewardModel(RewardModelConfig(blocks=blocks), trunk.to(dtype)).requires_grad_(False).eval()
            step = PRFLStep(run.prfl, run.sampling, reward, step_override=1)
            frozen.append(reward)
        else:
            frames = method.removeprefix("rgb_")
            rgb = RGBReFLConfig(frames=frames, random_weights=True, vae_config=args.vae_config,
                                reward_config=args.clip if frames == "first" else args.qwen,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
            step = build_rgb_refl_step(run, rgb, "meta", dtype)
            step.step_override = 1  # k = 1 of 2: the rollout's peak does not depend on k
            frozen += [step.scorer.vae.model, step.reward_model]
    if method == "rgb_all":  # the video model's token layout is integer bookkeeping: computed for real, once
        f, h, w = args.latent
        _, _, grid = step.reward_model.sizes(4 * (f - 1) + 1, 8 * h, 8 * w)
        step.reward_model.layout(1, grid, torch.device(DEVICE))
    # Tensors made from Python values (token ids, Qwen2-VL's patch grid) stay real constants up to this many
    # elements, so that the data-dependent index arithmetic of transformers' Qwen2-VL runs on real values.
    constants = mock.patch.object(fake_tensor, "CONSTANT_NUMEL_LIMIT", 1 << 16)
    with FakeTensorMode(allow_non_fake_inputs=True), constants, recorded_launches(), \
            mock.patch.object(engine.steps.feedback, "make_scheduler", real_scheduler):
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
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        null_context = torch.zeros(1, dit_config.text_dim)
        full = FeedbackWithSFTStep(step, SFTStep(run.sft, null_context), run.prfl.sft_weight)
        batch = {"latents": torch.zeros(1, dit_config.out_dim, *args.latent),
                 "context": torch.zeros(1, args.text_tokens, dit_config.text_dim)}
        if dit_config.model_type == "i2v":  # the image: CLIP tokens in the context, the condition beside x
            batch.update(clip_fea=torch.zeros(1, CLIP_TOKENS, dit_config.clip_dim),
                         y=torch.zeros(1, dit_config.in_dim - dit_config.out_dim, *args.latent))
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
    """The generator's ZeRO-3 model states and buffers on one rank (bytes): parameters and, for the trainable ones,
    gradients and optimizer states, on the device or the host as the DeepSpeed config offloads them; the gathered
    parameters and the reduce bucket; DeepSpeed's own estimate for full fine-tuning beside them."""
    from engine.train.estimate import zero3_model_states

    zero = ds_config["zero_optimization"]
    total = sum(p.numel() for p in dit.parameters())
    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    offload_optimizer = zero.get("offload_optimizer", {}).get("device") == "cpu"
    offload_params = zero.get("offload_param", {}).get("device") == "cpu"
    host_estimate, device_estimate, largest_layer = zero3_model_states(dit, zero, gpus_per_node=world)
    parameters = 2 * total / world  # bf16, frozen ones included: ZeRO-3 partitions every parameter
    # fp32 master copy, Adam's two moments, the fp32 gradient partition
    optimizer = 16 * trainable / world
    # With offload_optimizer (DeepSpeed 0.19's stage3.py): the master copy and the moments are plain host tensors;
    # the gradient partition is a pinned buffer, and so is each sub-group's gradient buffer (sub_group_size values),
    # each rounded to a power of two by the host allocator.
    partition = math.ceil(trainable / world)
    group = int(zero.get("sub_group_size", 1e9))
    sub_groups = [group] * (partition // group) + ([partition % group] if partition % group else [])
    pinned_optimizer = 12 * partition + pinned_size(4 * partition) + sum(pinned_size(4 * n) for n in sub_groups)
    # With offload_param each parameter's partition is pinned on its own (partition_parameters.py).
    pinned_parameters = sum(pinned_size(2 * math.ceil(p.numel() / world)) for p in dit.parameters())
    # Gathered full parameters: at most stage3_max_live_parameters bf16 values, at least the largest layer's.
    gathered = max(2 * largest_layer, 2 * min(total, int(zero.get("stage3_max_live_parameters", 1e9))))
    reduce_bucket = 2 * int(zero.get("reduce_bucket_size", 5e8)) if zero.get("contiguous_gradients", True) else 0
    return {"parameters_total": total, "parameters_trainable": trainable,
            "deepspeed_estimate_device": device_estimate, "deepspeed_estimate_host_node": host_estimate,
            "parameters": 0 if offload_params else parameters,
            "gradients_and_optimizer": 0 if offload_optimizer else optimizer,
            "gathered": gathered, "reduce_bucket": reduce_bucket,
            "host": (pinned_parameters if offload_params else 0) + (pinned_optimizer if offload_optimizer else 0)}


def nccl_buffers(world: int, sp: int) -> int:
    """NCCL's device buffers on one rank (an estimate): ring and tree connections of the world communicator (ZeRO's
    all-gathers and reduce-scatters) and, under sequence parallelism, of the data-parallel one, plus the Ulysses
    all-to-all's peer-to-peer buffers."""
    if world == 1:
        return 0
    collective = 2 * NCCL_CHANNELS * NCCL_CONNECTION  # one ring peer and the tree's
    communicators = 1 + (sp > 1 and world > sp)
    return communicators * collective + (sp - 1) * NCCL_P2P_CHANNELS * 4 * MiB


TERMS = {  # report column -> what it is
    "parameters_gb": "params", "gradients_and_optimizer_gb": "grads + optimizer", "zero3_gathered_gb": "ZeRO-3 gathered",
    "zero3_reduce_bucket_gb": "ZeRO-3 reduce bucket", "frozen_models_gb": "frozen models",
    "activations_gb": "activations", "temporaries_gb": "temporaries", "nccl_gb": "NCCL", "cuda_context_gb": "CUDA context",
    "allocator_headroom_gb": "allocator headroom"}


def model(args) -> dict:
    """The report of one setting (`args` as the command line gives them): a row per method and activation offload
    setting, every term in GB, the total and its fit on each of GPUS, host memory per rank and per node."""
    ds_config = json.loads((ROOT / args.ds_config).read_text())
    started = time.perf_counter()
    group = init_fake_ranks(args.world, args.sp)
    rows, states = [], None
    for method, sft in ((m, s) for m in args.methods for s in args.sft):
        case_started = time.perf_counter()
        traced = trace_case(args, method, sft, group)
        states = model_states(traced.pop("dit"), ds_config, args.world)
        for offload in (False, True):
            peak = traced["peaks"]["offload" if offload else "resident"]
            dynamic = peak["activations"] + peak["temporaries"]
            terms = {"parameters_gb": states["parameters"], "gradients_and_optimizer_gb": states["gradients_and_optimizer"],
                     "zero3_gathered_gb": states["gathered"], "zero3_reduce_bucket_gb": states["reduce_bucket"],
                     "frozen_models_gb": traced["frozen_bytes"], "activations_gb": peak["activations"],
                     "temporaries_gb": peak["temporaries"], "nccl_gb": nccl_buffers(args.world, args.sp),
                     "cuda_context_gb": CUDA_CONTEXT,
                     "allocator_headroom_gb": peak["segment_extra"] + FRAGMENTATION * dynamic}
            total = sum(terms.values())
            host = states["host"] + (traced["host_peak"] if offload else 0)
            rows.append({"method": method, "sft": sft, "activation_offload": offload, "phase_of_peak": peak["phase"],
                         **{k: v / GB for k, v in terms.items()}, "total_gb": total / GB,
                         **{f"fits_{gpu}": total <= capacity for gpu, capacity in GPUS.items()},
                         "host_activations_gb": traced["host_peak"] / GB if offload else 0.0,
                         "host_per_rank_gb": host / GB,
                         "host_per_node_gb": min(args.world, RANKS_PER_NODE) * host / GB,
                         "trace_s": time.perf_counter() - case_started})
            print(json.dumps(rows[-1]), flush=True)
    dist.destroy_process_group()
    tokens = math.prod(s // p for s, p in zip(args.latent, DiTConfig.preset(args.preset).patch_size))
    return {"preset": args.preset, "latent": list(args.latent), "tokens": tokens, "world": args.world,
            "sp": args.sp, "tokens_per_rank": math.ceil(tokens / args.sp), "text_tokens": args.text_tokens,
            "ds_config": args.ds_config, "precision": "bf16", "micro_batch": 1,
            "kernels": args.kernels, "lora_rank": args.lora_rank, "generator_parameters": states["parameters_total"],
            "trainable_parameters": states["parameters_trainable"],
            "deepspeed_zero3_device_estimate_gb": states["deepspeed_estimate_device"] / GB,
            "deepspeed_zero3_host_estimate_per_node_gb": states["deepspeed_estimate_host_node"] / GB,
            "gpus_gb": {gpu: capacity / GB for gpu, capacity in GPUS.items()},
            "assumptions": {"nccl_channels": NCCL_CHANNELS, "cuda_context_gb": CUDA_CONTEXT / GB,
                            "fragmentation": FRAGMENTATION, "ranks_per_node": RANKS_PER_NODE},
            "torch": torch.__version__, "methods": {m: METHODS[m] for m in args.methods}, "smoke": args.smoke,
            "runtime_s": time.perf_counter() - started, "rows": rows}


def write_report(report: dict, out_dir: Path) -> Path:
    f, h, w = report["latent"]
    lora = f"-lora{report['lora_rank']}" if report["lora_rank"] else ""
    params = "-params-on-host" if "offload_param" in json.loads((ROOT / report["ds_config"]).read_text())[
        "zero_optimization"] else ""
    stem = out_dir / f"memory_model-{report['preset']}-{f}x{h}x{w}-w{report['world']}sp{report['sp']}{lora}{params}"
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))  # the preset has dots: no with_suffix
    tuning = f"LoRA rank {report['lora_rank']} ({report['trainable_parameters'] / 1e6:.0f} M trainable)" \
        if report["lora_rank"] else "full fine-tuning"
    gpus = list(report["gpus_gb"])
    lines = [f"# Modelled peak memory per rank: {report['preset']}, latent {f}x{h}x{w} ({report['tokens']:,} tokens), "
             f"{report['world']} ranks, sp {report['sp']}, {tuning}", "",
             f"Traced on fake tensors (torch {report['torch']}, {report['kernels']} kernels), {report['ds_config']}, "
             f"bf16, micro-batch 1, {report['text_tokens']} text tokens; "
             f"{report['generator_parameters'] / 1e9:.2f} B generator parameters. Activations and temporaries: the "
             "traced peak of live tensors (allocator-rounded); the other terms by rule, modelled "
             f"(benchmarks/memory_model.py: NCCL with {report['assumptions']['nccl_channels']} channels, CUDA "
             f"context {report['assumptions']['cuda_context_gb']:.2f} GB, fragmentation allowance "
             f"{report['assumptions']['fragmentation']:.0%} of the dynamic peak). DeepSpeed's own estimate of the "
             f"model states (full fine-tuning): {report['deepspeed_zero3_device_estimate_gb']:.2f} GB per GPU, "
             f"{report['deepspeed_zero3_host_estimate_per_node_gb']:.1f} GB of host memory per node. Host: pinned "
             "buffers at the host allocator's power-of-two sizes; per node: "
             f"{min(report['world'], RANKS_PER_NODE)} ranks. At start-up each rank also builds the whole generator in "
             "host memory before ZeRO-3 partitions it (not counted). GB = 2^30 bytes.", "",
             "| method | SFT | act. offload | " + " | ".join(TERMS.values()) + " | **total** | "
             + " | ".join(gpus) + " | host / rank | host / node | peak in |",
             "|---|---|---|" + "---|" * (len(TERMS) + 1 + len(gpus) + 3)]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['sft']} | {'on' if r['activation_offload'] else 'off'} | "
                     + " | ".join(f"{r[c]:.2f}" for c in TERMS) + f" | **{r['total_gb']:.2f}** | "
                     + " | ".join("fits" if r[f"fits_{g}"] else "does not fit" for g in gpus)
                     + f" | {r['host_per_rank_gb']:.1f} | {r['host_per_node_gb']:.1f} | {r['phase_of_peak']} |")
    lines += ["", *[f"- `{m}`: {text}" for m, text in report["methods"].items()], "",
              "Regenerate: `" + " ".join(["python -m benchmarks.memory_model", *report["arguments"]]) + "`"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--preset", default="wan2.1-t2v-14b")
    p.add_argument("--latent", type=int, nargs=3, default=(21, 90, 160), metavar=("F", "H", "W"),
                   help="latent frames, height, width (720P x 81 frames: 21 90 160; 480P: 21 60 104)")
    p.add_argument("--world", type=int, default=8, help="ranks (ZeRO-3 partitions over all of them)")
    p.add_argument("--sp", type=int, default=8, help="Ulysses sequence-parallel degree")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--reward-blocks", type=int, default=8, help="PAVRM trunk depth K")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (default: full fine-tuning)")
    p.add_argument("--kernels", choices=("triton", "torch"), default="triton",
                   help="the DiT's elementwise kernels (triton: what a GPU runs)")
    p.add_argument("--ds-config", default="ds_configs/z3_offload.json")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--sft", nargs="+", choices=("on", "off"), default=["on"],
                   help="the SFT loss (weight 1, batched with the reward step's evaluation) on or off")
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes; writes to a temporary folder")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.vae_config, args.clip, args.qwen = {}, {}, {}
    args.min_pixels, args.max_pixels = RGBReFLConfig.min_pixels, RGBReFLConfig.max_pixels
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    report = {**model(args), "arguments": [a for a in argv if not a.startswith("--out")]}
    stem = write_report(report, args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results"))
    print(f"wrote {stem}.json and .md in {report['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
