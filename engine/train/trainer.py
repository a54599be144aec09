"""The DeepSpeed engine and the train loop. This is the only file that talks to DeepSpeed's engine API.

    trainer = Trainer(run_config, ds_config, spec)         # distributed init, model, engine, data
    trainer.fit(step)                                      # loop: data, step, backward, log, evaluate, save

What is trained and exported is the spec (specs.py: the generator, or a PAVRM); what differs between SFT,
reward-model training and PRFL lives in the step object: a callable `step(model, batch, rng) -> (loss, metrics)`.
A step consumes a global batch of consecutive sample numbers; a sample's data and randomness (noise, timestep,
prompt dropout) depend only on its number, so runs with the same global batch on different numbers of ranks see the
same samples and draws, the ranks of a sequence-parallel group draw the same, and a resumed run draws what the
uninterrupted run would have drawn.

Run folder:
    config.yaml, ds_config.json, run_info.json     resolved run config, DeepSpeed config as used, git commit
    metrics.jsonl, tensorboard/                    one line / scalar set per logged step
    checkpoints/step_000010/                       DeepSpeed checkpoint (model, optimizer, scheduler, client state)
        rank_state/rank_00000.pt                   per-rank RNG states
        ema/rank_00000.pt                          train.ema_decay > 0: each rank's shards of the EMA (ema.py)
        model/                                     the export: a DiT folder (load_dit) or a PAVRM folder
        lora/                                      LoRA runs: the adapters (model/ is then the merged model)
        model_ema/, lora_ema/                      the same export of the EMA weights
        COMPLETE                                   written last: only complete checkpoints are resumed from
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from engine.atomic import atomic_write_text
from engine.config import RunConfig
from engine.config_io import to_dict
from engine.data.datasets import collate
from engine.data.order import sample_order
from engine.distributed.offload import apply_activation_checkpointing
from engine.distributed.parallel import apply_ulysses
from engine.distributed.process import init_distributed, log
from engine.errors import ConfigError
from engine.model.dit import DiT
from engine.model.lora import has_lora
from engine.train.checkpoint import COMPLETE, complete_checkpoints, consolidated_state, find_resume_point, git_commit
from engine.train.ds_config import lr_lambda, resolve_ds_config
from engine.train.ema import consolidate, model_ema
from engine.train.randomness import SampleRandomness
from engine.train.specs import GeneratorSpec, ModelSpec, export

StepFn = Callable[[torch.nn.Module, dict, SampleRandomness], tuple[torch.Tensor, dict]]


class Trainer:
    """Builds the distributed engine of what `spec` trains (default: the run's generator) and drives the loop."""

    def __init__(self, config: RunConfig, ds_config: dict, spec: ModelSpec | None = None, *,
                 run_dir: str | Path | None = None, resume: str | None = None, dataset=None) -> None:
        self.config, self.spec = config, spec or GeneratorSpec(config)
        self.run_dir = Path(run_dir or config.output_dir)
        self.layout, self.mpu = init_distributed(config.parallel.sp_size)
        self.ds_config = resolve_ds_config(ds_config, config, self.layout)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = self.spec.build(self.dtype)
        if config.lora.rank and not has_lora(self.transformer):
            raise ConfigError(f"lora.rank={config.lora.rank}: a {self.spec.name} run does not train LoRA adapters")
        self.distribute(self.transformer)

        self.dataset = dataset or self.spec.dataset(self.transformer.config)
        self.order = sample_order(self.dataset, config.train.micro_batch_size, config.seed)

        self._check_bucket_size()
        point = find_resume_point(self.run_dir, resume)
        if point is not None and (point / "universal").is_dir():
            # A checkpoint converted with DeepSpeed's ds_to_universal loads on any number of ranks.
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=self.spec.parameter_groups(self.model),
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

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32

    @property
    def transformer(self) -> DiT:
        """The DiT inside the trained model: sequence parallelism and activation checkpointing apply to it."""
        return self.spec.transformer(self.model)

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
        info = self.spec.checkpoint_info(self.model)
        self.engine.save_checkpoint(str(checkpoints), tag=tag, save_latest=False,
                                    client_state={"step": self.step, "samples_seen": self.step * self.global_batch,
                                                  **info})
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
                export(state, info, path / "model", path / "lora")
                if self.ema is not None:  # frozen parameters (LoRA base, reward embeddings) are their own average
                    export({**state, **consolidate(path / "ema")}, info, path / "model_ema", path / "lora_ema")
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
