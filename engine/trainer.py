"""The DeepSpeed engine and the train loop. This is the only file that talks to DeepSpeed's engine API.

    trainer = Trainer(run_config, ds_config, run_dir)      # distributed init, model, engine, data
    trainer.fit(step)                                      # loop: data, step, backward, log, evaluate, save

What differs between SFT, reward-model training and PRFL lives in the step object: a callable
`step(model, batch, rng) -> (loss, metrics)`. A step consumes a global batch of consecutive sample numbers; a sample's
data and randomness (noise, timestep, prompt dropout) depend only on its number, so runs with the same global batch
on different numbers of ranks see the same samples and draws, the ranks of a sequence-parallel group draw the same,
and a resumed run draws what the uninterrupted run would have drawn.

Run folder:
    config.yaml, ds_config.json, run_info.json     resolved run config, DeepSpeed config as used, git commit
    metrics.jsonl, tensorboard/                    one line / scalar set per logged step
    checkpoints/step_000010/                       DeepSpeed checkpoint (model, optimizer, scheduler, client state)
        rank_state/rank_00000.pt                   per-rank RNG states
        ema/rank_00000.pt                          train.ema_decay > 0: each rank's shards of the EMA (engine/ema.py)
        model/                                     consolidated safetensors + config.json (DiT.from_pretrained)
        lora/                                      LoRA runs: the adapters (model/ is then the merged model)
        model_ema/, lora_ema/                      the same export of the EMA weights
        COMPLETE                                   written last: only complete checkpoints are resumed from
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from engine.atomic import atomic_write_text
from engine.config import ConfigError, RunConfig, to_dict
from engine.data import SampleRandomness, build_dataset, collate, sample_order
from engine.dit import DiT, DiTConfig
from engine.ema import consolidate, model_ema
from engine.lora import add_lora, has_lora, save_lora_export
from engine.offload import apply_activation_checkpointing
from engine.parallel import Layout, apply_ulysses, init_distributed
from engine.weights import read_config, save_dit_state

COMPLETE = "COMPLETE"
StepFn = Callable[[torch.nn.Module, dict, SampleRandomness], tuple[torch.Tensor, dict]]


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed config


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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints on disk


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint is finished once its COMPLETE marker exists)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if (p / COMPLETE).exists())


def find_resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: newest complete checkpoint of the run (None if there is none); otherwise a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists() and not (path / "universal").is_dir():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def consolidated_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, consolidated by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


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


def dry_run(config: RunConfig, ds_template: dict, dataset=None, frozen: torch.nn.Module | None = None,
            model: torch.nn.Module | None = None, forwards_per_sample: int = 1) -> dict:
    """Check config, DeepSpeed config and data against the model (built on the meta device) and estimate memory.

    `model`: what is trained, on the meta device (default: the run's DiT); a model around a DiT (the reward model)
    keeps it as `.trunk`. `frozen`: a model that runs beside it as `Trainer.distribute` runs it (PRFL's reward trunk),
    on the meta device: its parameters (replicated, in the run's precision) and block checkpoints are estimated too.
    `forwards_per_sample`: evaluations a sample makes with gradients (BT scores both videos of a pair: 2).
    Nothing is trained and no engine is built; the world size comes from the launcher's environment.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout(int(os.environ.get("RANK", 0)), world, config.parallel.sp_size)
    ds = resolve_ds_config(ds_template, config, layout)
    if model is None:
        dit_config = read_config(config.model.path) if config.model.path else DiTConfig.preset(config.model.preset)
        with torch.device("meta"):
            model = DiT(dit_config)
    dit_config = getattr(model, "trunk", model).config
    if dit_config.num_heads % layout.sp_size:
        raise ConfigError(f"parallel.sp_size={layout.sp_size} must divide the model's {dit_config.num_heads} heads")
    dataset = dataset or build_dataset(config.data, dit_config, config.seed)
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
    boundary = 4 * config.train.micro_batch_size * forwards_per_sample * math.ceil(tokens / layout.sp_size) * \
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
    return report


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Builds the distributed DiT engine for a run and drives the loop."""

    def __init__(self, config: RunConfig, ds_config: dict, run_dir: str | Path | None = None,
                 resume: str | None = None, dataset=None) -> None:
        self.config = config
        self.run_dir = Path(run_dir or config.output_dir)
        self.layout, self.mpu = init_distributed(config.parallel.sp_size)
        self.ds_config = resolve_ds_config(ds_config, config, self.layout)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = self.build_model()
        if config.lora.rank and not has_lora(self.transformer):
            raise ConfigError(f"lora.rank={config.lora.rank}: {type(self).__name__} does not train LoRA adapters")
        self.distribute(self.transformer)

        self.dataset = dataset or self.build_dataset()
        self.order = sample_order(self.dataset, config.train.micro_batch_size, config.seed)

        self._check_bucket_size()
        point = find_resume_point(self.run_dir, resume)
        if point is not None and (point / "universal").is_dir():
            # A checkpoint converted with DeepSpeed's ds_to_universal loads on any number of ranks.
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=self.parameter_groups(),
            config=self.ds_config, mpu=self.mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)))
        self.step = 0
        offloaded = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
        # Beside the fp32 master weights: in host memory when the optimizer is offloaded, so no GPU memory is spent.
        self.ema = model_ema(self.model, config.train.ema_decay, config.train.ema_start,
                             torch.device("cpu") if offloaded else self.device)
        self._write_run_info()
        if point is not None:
            self._load(point)

    def distribute(self, model: DiT) -> DiT:
        """Run `model` (the trained DiT, or a frozen one beside it such as PRFL's reward trunk) like the run's
        generator: sequence-parallel over the run's groups, its blocks checkpointed (block inputs offloaded)."""
        if self.config.parallel.sp_size > 1:
            apply_ulysses(model, self.mpu.get_sequence_parallel_group())
        if self.config.memory.checkpointing:
            apply_activation_checkpointing(model, offload=self.config.memory.offload)
        return model

    def _check_bucket_size(self) -> None:
        zero = self.ds_config["zero_optimization"]
        largest = max(p.numel() for p in self.model.parameters())
        if self.layout.sp_size > 1 and zero["stage"] == 3 and largest > int(zero.get("reduce_bucket_size", 5e8)):
            raise ConfigError(f"zero_optimization.reduce_bucket_size={zero.get('reduce_bucket_size')} is smaller "
                              f"than the largest parameter ({largest} elements); under sequence parallelism "
                              "DeepSpeed then takes a path that mis-scales gradients")

    # -- what is trained: overridden by trainers of other models built around a DiT (the reward model) -------------

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32

    def build_model(self) -> torch.nn.Module:
        cfg = self.config.model
        runtime = {"attention_backend": cfg.attention_backend, "kernel_backend": cfg.kernel_backend}
        if cfg.path:
            model = DiT.from_pretrained(cfg.path, dtype=self.dtype, **runtime)
        else:
            model = DiT(DiTConfig.preset(cfg.preset, **runtime)).to(self.dtype)
        if self.config.lora.rank:
            add_lora(model, self.config.lora)
        return model

    @property
    def transformer(self) -> DiT:
        """The DiT inside the trained model: sequence parallelism and activation checkpointing apply to it."""
        return self.model

    def build_dataset(self):
        return build_dataset(self.config.data, self.transformer.config, self.config.seed)

    def parameter_groups(self) -> list:
        """What the optimizer updates (parameters, or param-group dicts with their own `lr`)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def export(self, state: dict[str, torch.Tensor], out: Path) -> None:
        """Write a consolidated state dict of the model as a loadable folder (LoRA: merged, the adapters beside in
        `lora/` for `model/`, `lora_ema/` for `model_ema/`)."""
        if self.config.lora.rank:
            save_lora_export(state, self.model.config, self.config.lora, out,
                             out.with_name(out.name.replace("model", "lora", 1)))
        else:
            save_dit_state(state, self.model.config, out)

    @property
    def is_main(self) -> bool:
        return self.layout.rank == 0

    def _write_run_info(self) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.config), sort_keys=False))
        atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        info = {"git_commit": git_commit(), "world_size": self.layout.world_size, "sp_size": self.layout.sp_size,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.run_dir / "run_info.json", json.dumps(info, indent=2))

    # -- data and randomness ------------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        train = self.config.train
        return train.micro_batch_size * train.grad_accum * self.layout.dp_size

    def sample_numbers(self, micro: int) -> list[int]:
        """The run-wide numbers of the samples this rank takes in micro-batch `micro` of the current step."""
        size = self.config.train.micro_batch_size
        first = self.step * self.global_batch + (micro * self.layout.dp_size + self.layout.dp_rank) * size
        return list(range(first, first + size))

    def _batch(self, numbers: list[int]) -> dict[str, torch.Tensor]:
        # Kept in fp32: targets are formed at full precision, the model casts its inputs itself.
        batch = collate([self.dataset[self.order.index(n)] for n in numbers])
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- loop ---------------------------------------------------------------------------------------------------

    def train_step(self, step_fn: StepFn) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns metrics averaged over the micro-batches that
        report them (a step function may report a metric only for some, e.g. the reward of one stage of the chain;
        every rank reports the same names for a micro-batch) and over the ranks."""
        self.engine.train()
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for micro in range(self.config.train.grad_accum):
            numbers = self.sample_numbers(micro)
            rng = SampleRandomness(self.config.seed, numbers, self.device,
                                   micro_batch=self.step * self.config.train.grad_accum + micro, step=self.step)
            loss, metrics = step_fn(self.engine, self._batch(numbers), rng)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float()
                counts[key] = counts.get(key, 0) + 1
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        names = sorted(totals)
        values = torch.stack([totals[k] / counts[k] for k in names]).to(self.device)
        dist.all_reduce(values)
        result = dict(zip(names, (values / self.layout.world_size).tolist()))
        result["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        return result

    def fit(self, step_fn: StepFn, evaluate: Callable[["Trainer"], dict[str, float]] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        train = self.config.train
        writer = SummaryWriter(self.run_dir / "tensorboard") if self.is_main else None
        bar = tqdm(total=train.steps, initial=self.step, desc=step_fn.name, disable=not self.is_main)
        if evaluate is not None and train.eval_every and self.step == 0:
            start = evaluate(self)  # where the run starts from (every rank takes part: ZeRO-3 gathers collectively)
            if self.is_main:
                self._log(start, writer, bar)
        while self.step < train.steps:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            metrics = self.train_step(step_fn)
            metrics["step_time_s"] = time.perf_counter() - started
            metrics.update(self.peak_memory())
            if evaluate is not None and train.eval_every and (self.step % train.eval_every == 0
                                                              or self.step == train.steps):
                metrics.update(evaluate(self))
            if self.is_main and (self.step % train.log_every == 0 or self.step == train.steps
                                 or any(k.startswith("val/") for k in metrics)):
                self._log(metrics, writer, bar)
            bar.update(1)
            if (train.save_every and self.step % train.save_every == 0) or self.step == train.steps:
                self.save()
        bar.close()
        if writer is not None:
            writer.close()

    def peak_memory(self) -> dict[str, float]:
        """Peak memory of the step, the largest over the ranks: device memory allocated (CUDA; reset every step)
        and the process's resident host memory (since it started)."""
        peaks = {"memory/peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if torch.cuda.is_available():
            peaks["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            peaks["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        values = torch.tensor(list(peaks.values()), device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(peaks, values.tolist()))

    def _log(self, metrics: dict[str, float], writer, bar) -> None:
        if not metrics:  # an evaluation with nothing to score (no reward model, no judge) leaves no record
            return
        for key, value in metrics.items():
            writer.add_scalar(key, value, self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        bar.write(f"step {self.step}/{self.config.train.steps} "
                  + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    @contextlib.contextmanager
    def full_parameters(self):
        """Every rank holds the whole model inside (ZeRO-3 gathers, read-only): for evaluation and sampling."""
        import deepspeed

        self.engine.eval()
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            yield self.model

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write a DeepSpeed checkpoint, per-rank RNG states and (rank 0) the consolidated export; COMPLETE last."""
        checkpoints = self.run_dir / "checkpoints"
        tag = f"step_{self.step:06d}"
        path = checkpoints / tag
        self.engine.save_checkpoint(str(checkpoints), tag=tag, save_latest=False,
                                    client_state={"step": self.step, "samples_seen": self.step * self.global_batch,
                                                  "dit_config": self.transformer.config.to_dict(),
                                                  "lora": to_dict(self.config.lora)})
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        (path / "rank_state").mkdir(exist_ok=True)
        staging = path / "rank_state" / f".rank_{self.layout.rank:05d}.pt.tmp"
        torch.save(rng, staging)
        os.replace(staging, path / "rank_state" / f"rank_{self.layout.rank:05d}.pt")
        if self.ema is not None:
            self.ema.save(path / "ema", self.layout.rank)
        dist.barrier()
        if self.is_main:
            if self.config.train.export:
                state = consolidated_state(path)
                self.export(state, path / "model")
                if self.ema is not None:  # frozen parameters (LoRA base, reward embeddings) are their own average
                    self.export({**state, **consolidate(path / "ema")}, path / "model_ema")
            atomic_write_text(path / COMPLETE, f"{self.step}\n")
            for old in complete_checkpoints(checkpoints)[:-self.config.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def _load(self, point: Path) -> None:
        universal = (point / "universal").is_dir()
        load_dir, tag = (point, "universal") if universal else (point.parent, point.name)
        _, client = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if client is None:
            raise ConfigError(f"--resume {point}: DeepSpeed could not load this checkpoint")
        self.step = client["step"]
        if client["samples_seen"] != self.step * self.global_batch:
            raise ConfigError(f"--resume {point}: the checkpoint saw {client['samples_seen']} samples in {self.step} "
                              f"steps, but this run's global batch is {self.global_batch}; keep the global batch")
        rank_file = point / "rank_state" / f"rank_{self.layout.rank:05d}.pt"
        if rank_file.exists():  # absent when resuming on more ranks than saved
            rng = torch.load(rank_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        if self.ema is not None and not self.ema.load(point / "ema", self.layout.rank):
            log(f"--resume {point}: the checkpoint has no EMA; it starts from the resumed weights")
        log(f"resumed from {point} at step {self.step}")
