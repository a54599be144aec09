"""PRFL against RGB ReFL on one GPU: peak memory, step time, tokens/s and where the time goes, case by case.

    python -m benchmarks.step_memory_speed            # the whole matrix below (hours on one GPU; unattended)
    python -m benchmarks.step_memory_speed --models 1.3b --resolutions 480p --sft on     # a slice of it
    python -m benchmarks.step_memory_speed --smoke --methods prfl rgb_all --tuning lora --sft on   # tiny, any device

Matrix: {Wan2.1 1.3B, 14B} x {480P, 720P} x 81 frames x {PRFL, RGB ReFL first frame, RGB ReFL all frames} x
{full fine-tuning, LoRA rank 32} x {with, without the SFT loss}. Each case runs in its own process (an OOM cannot
poison the next; benchmarks/child.py) through the real engine: DeepSpeed ZeRO-3 with the optimizer on the CPU
(ds_configs/z3_offload.json), bf16, block checkpointing; on OOM (while the models are built or in a step) the case is
retried once with activation offload, and a second OOM is recorded with the settings tried. Weights and data are
random (cost does not depend on values).

- PRFL: `PRFLStep` (k uniform over the chain) with a frozen K=8-block PAVRM of the same model; its trunk is
  block-checkpointed like the generator, by `Trainer.distribute` as runners/prfl.py does (without it 720P does not
  fit).
- RGB ReFL: `RGBReFLStep` (k in the chain's last quarter, prfl.stage=last_quarter; one-step x0; Wan2.1 VAE decode
  with per-frame checkpointing; CLIP ViT-H/14 image reward on frame 1, or Qwen2-VL-2B video reward on all frames at
  2 fps), engine/steps/rgb_refl.py.

Per case: one warm-up step, then `--steps` optimizer steps, each timed with the GPU synchronised at the phase
boundaries: rollout (no-grad steps 0..k-1), gradient forward (step k, batched with the SFT prediction), reward
(PAVRM, or decode + pixel reward model; decode also on its own), backward, optimizer step. Reported: median step
time; the expected step time over the method's k distribution (the measured step minus its rollout, plus E[k] times
the measured cost of one rollout step), since k is random and a few steps sample it poorly; tokens/s (generator
tokens per sample / median step time); peak allocated and reserved memory after the warm-up. SFT's cost is the
difference between the `sft on` and `sft off` rows of a case.
Writes benchmarks/results/step-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.child import report_case, with_offload_retry

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}
RESOLUTIONS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # latents of 81 frames at 832x480 / 1280x720
METHODS = ("prfl", "rgb_first", "rgb_all")
TUNING = ("full", "lora")
LORA_RANK = 32
REWARD_BLOCKS = 8
PHASES = ("rollout", "gradient_forward", "reward", "decode", "backward", "optimizer")


class PhaseTimer:
    """Wall time of named phases of a step, the GPU synchronised at each boundary."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times = cuda, {}

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            started = self.now()
            result = fn(*args, **kwargs)
            self.times[name] = self.times.get(name, 0.0) + self.now() - started
            return result
        return timed


def mean_step_index(steps: int, stage: str) -> float:
    """E[k] of a stage, by engine.steps.feedback.step_index on an even grid of draws."""
    from engine.steps.feedback import step_index

    draws = 10_000
    return sum(step_index((i + 0.5) / draws, steps, stage) for i in range(draws)) / draws


def build_step(case: dict, config, trainer):
    """The case's reward step (PRFL or RGB ReFL) wrapped with the SFT loss, as runners/prfl.py combines them."""
    import torch

    from engine.config import RGBReFLConfig
    from engine.model.dit import DiT, DiTConfig
    from engine.model.reward import RewardModel, RewardModelConfig
    from engine.steps.feedback import FeedbackWithSFTStep
    from engine.steps.prfl import PRFLStep
    from engine.steps.rgb_refl import TINY_CLIP, TINY_PIXELS, TINY_QWEN2_VL, TINY_VAE, build_rgb_refl_step
    from engine.steps.sft import SFTStep

    device, dtype = trainer.device, trainer.dtype
    null_context = trainer.dataset.null_context.to(device)
    if case["method"] == "prfl":
        blocks = min(REWARD_BLOCKS, trainer.transformer.config.num_layers)
        with torch.device(device):
            trunk = DiT(DiTConfig.preset(config.model.preset, num_layers=blocks))
        reward = RewardModel(RewardModelConfig(blocks=blocks), trunk).to(device, dtype).requires_grad_(False).eval()
        trainer.distribute(reward.trunk)
        step = PRFLStep(config.prfl, config.sampling, reward, null_context)
    else:
        tiny = case["smoke"]
        frames = case["method"].removeprefix("rgb_")
        rgb = RGBReFLConfig(frames=frames, random_weights=True, vae_config=TINY_VAE if tiny else {},
                            reward_config=(TINY_CLIP if frames == "first" else TINY_QWEN2_VL) if tiny else {},
                            **(dict(min_pixels=TINY_PIXELS[0], max_pixels=TINY_PIXELS[1]) if tiny else {}))
        step = build_rgb_refl_step(config, rgb, device, dtype, null_context)
    return step, FeedbackWithSFTStep(step, SFTStep(config.sft, null_context), config.prfl.sft_weight)


def run_case(case: dict) -> dict:
    """One attempt of one case in this process. An out-of-memory error says what was being done."""
    import torch

    from benchmarks.child import is_out_of_memory
    from engine.config_io import load_config
    from engine.train.trainer import Trainer

    cuda = torch.cuda.is_available()
    doing = "building the trainer"
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.preset={case['preset']}", f"data.latent_shape={case['latent']}", "data.num_samples=2",
                     f"data.text_tokens={case['text_tokens']}", f"output_dir={run_dir}", "train.export=false",
                     "train.steps=1000", f"sampling.steps={case['sampling_steps']}",
                     f"prfl.sft_weight={1.0 if case['sft'] == 'on' else 0.0}", "memory.checkpointing=true",
                     f"memory.offload={str(case['offload']).lower()}",
                     f"lora.rank={LORA_RANK if case['tuning'] == 'lora' else 0}",
                     # RGB ReFL as published supervises the last quarter of the chain; PRFL the whole chain
                     f"prfl.stage={'all' if case['method'] == 'prfl' else 'last_quarter'}"]
        try:
            config = load_config(ROOT / "configs/tiny.yaml", overrides)
            trainer = Trainer(config, json.loads((ROOT / case["ds_config"]).read_text()))
            doing = "building the reward step"
            reward_step, step = build_step(case, config, trainer)
            timer = PhaseTimer(cuda)
            for name in ("rollout", "reward"):
                setattr(reward_step, name, timer.wrap(name, getattr(reward_step, name)))
            if case["method"] != "prfl":
                reward_step.scorer.decode = timer.wrap("decode", reward_step.scorer.decode)
            engine = trainer.engine
            engine.backward, engine.step = timer.wrap("backward", engine.backward), timer.wrap("optimizer", engine.step)
            timed_step = timer.wrap("step_call", step)
            doing = "the warm-up step"
            trainer.train_step(timed_step)  # warm-up: allocator, DeepSpeed buffers, CPU Adam
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # building the models left fp32 copies in the cache; not the step's
                torch.cuda.reset_peak_memory_stats()
            doing = "the timed steps"
            rows = []
            for _ in range(case["steps"]):
                timer.times = {}
                started = timer.now()
                metrics = trainer.train_step(timed_step)
                total = timer.now() - started
                t = timer.times
                rows.append({"step_s": total, "k": round(metrics["reward/step_fraction"] * case["sampling_steps"]),
                             "rollout": t["rollout"], "reward": t["reward"], "decode": t.get("decode", 0.0),
                             "gradient_forward": t["step_call"] - t["rollout"] - t["reward"],
                             "backward": t["backward"], "optimizer": t["optimizer"]})
        except Exception as e:
            if is_out_of_memory(e):
                return {"status": "OOM", "while": doing, "error": str(e).splitlines()[0]}
            raise
    per_rollout_step = [r["rollout"] / r["k"] for r in rows if r["k"]]
    expected_k = mean_step_index(case["sampling_steps"], config.prfl.stage)
    median = statistics.median(r["step_s"] for r in rows)
    return {
        "status": "ok", "step_time_s": median, "steps_timed": len(rows), "k": [r["k"] for r in rows],
        "expected_k": expected_k,
        "expected_step_time_s": statistics.median(r["step_s"] - r["rollout"] for r in rows)
        + expected_k * (statistics.median(per_rollout_step) if per_rollout_step else 0.0),
        "tokens": case["tokens"], "tokens_per_s": case["tokens"] / median,
        "phases_s": {p: statistics.median(r[p] for r in rows) for p in PHASES},
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }


def make_case(model: str, resolution: str, method: str, tuning: str, sft: str, *, steps: int, sampling_steps: int,
              text_tokens: int = 512, ds_config: str = "ds_configs/z3_offload.json", smoke: bool = False) -> dict:
    """A case of the matrix (smoke: the tiny model at a tiny latent)."""
    preset, latent = ("tiny", (3, 4, 6)) if smoke else (MODELS[model], RESOLUTIONS[resolution])
    return {"model": "tiny" if smoke else model, "preset": preset, "resolution": "smoke" if smoke else resolution,
            "latent": list(latent), "tokens": latent[0] * latent[1] * latent[2] // 4, "method": method,
            "tuning": tuning, "sft": sft, "steps": steps, "sampling_steps": sampling_steps,
            "text_tokens": text_tokens, "ds_config": ds_config, "smoke": smoke}


def measure(case: dict, timeout: float) -> dict:
    """One case in a child process of its own (benchmarks/child.py); on a GPU, retried with activation offload
    after an out-of-memory error."""
    return with_offload_retry("benchmarks.step_memory_speed", case, timeout, retry=not case["smoke"])


def make_report(results: list[dict], *, ds_config: str, steps: int, sampling_steps: int, text_tokens: int,
                smoke: bool) -> dict:
    """The report of measured cases: the cases' results and every setting they share."""
    import deepspeed
    import torch

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "gpus": 1, "sp_size": 1,
            "ds_config": ds_config, "precision": "bf16" if cuda else "fp32", "steps": steps,
            "sampling_steps": sampling_steps, "text_tokens": text_tokens, "lora_rank": LORA_RANK,
            "pavrm_blocks": REWARD_BLOCKS, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "smoke": smoke, "results": results}


def label(r: dict) -> str:
    return f"{r['model']} {r['resolution']} {r['method']} {r['tuning']} sft-{r['sft']}"


def write_reports(report: dict, stem: Path) -> None:
    """stem.json, stem.md and stem.png (stem's name may hold dots: no with_suffix)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    ok = [r for r in report["results"] if r["status"] == "ok"]
    lines = [f"# PRFL vs RGB ReFL, one step on {report['device']}", "",
             f"One device, {report['ds_config']}, {report['precision']}, block checkpointing, micro-batch 1, "
             f"{report['text_tokens']} text tokens, {report['sampling_steps']}-step UniPC chain, median of "
             f"{report['steps']} steps after one warm-up; LoRA rank {LORA_RANK}; torch {report['torch']}, deepspeed "
             f"{report['deepspeed']}. Times in seconds, memory in GB (2^30 bytes).", "",
             "| model | res | method | tuning | SFT | status | act. offload | step (median) | step (E[k]) | tokens/s "
             "| peak alloc | peak reserved | rollout | grad fwd | reward | decode | backward | optimizer |",
             "|" + "---|" * 18]
    for r in report["results"]:
        if r["status"] != "ok":
            tried = ", ".join(f"offload={'on' if a['activation_offload'] else 'off'}: {a['status']}"
                              for a in r.get("attempts", []))
            lines.append(f"| {r['model']} | {r['resolution']} | {r['method']} | {r['tuning']} | {r['sft']} | "
                         f"{r['status']} ({tried}) |" + " |" * 12)
            continue
        mem = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("peak_allocated_gb", "peak_reserved_gb")]
        lines.append(f"| {r['model']} | {r['resolution']} | {r['method']} | {r['tuning']} | {r['sft']} | ok | "
                     f"{'on' if r['activation_offload'] else 'off'} | {r['step_time_s']:.2f} | "
                     f"{r['expected_step_time_s']:.2f} | {r['tokens_per_s']:.0f} | {mem[0]} | {mem[1]} | "
                     + " | ".join(f"{r['phases_s'][p]:.2f}" for p in PHASES) + " |")
    lines += ["", "k drawn per timed step: " + "; ".join(f"{label(r)}: {r['k']}" for r in ok)]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")

    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # a bare GPU image: the tables are the report
        print(f"matplotlib is not installed: no {stem}.png", flush=True)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(3, 0.35 * len(ok) + 1.5)))
    names = [label(r) for r in ok]
    bottom = [0.0] * len(ok)
    for phase in ("rollout", "gradient_forward", "reward", "backward", "optimizer"):
        values = [r["phases_s"][phase] for r in ok]
        left.barh(names, values, left=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_xlabel("seconds per step (median phases)")
    left.legend(fontsize=7)
    right.barh(names, [r["peak_allocated_gb"] or 0 for r in ok])
    right.set_xlabel("peak allocated GB")
    right.set_yticks([])
    fig.suptitle(f"PRFL vs RGB ReFL on {report['device']}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--resolutions", nargs="+", choices=RESOLUTIONS, default=list(RESOLUTIONS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tuning", nargs="+", choices=TUNING, default=list(TUNING))
    parser.add_argument("--sft", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case (after one warm-up)")
    parser.add_argument("--sampling-steps", type=int, default=40, help="steps of the sampling chain (paper: 40)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--ds-config", default="ds_configs/z3_offload.json")
    parser.add_argument("--case-timeout", type=float, default=7200, help="seconds before a case is abandoned")
    parser.add_argument("--smoke", action="store_true", help="tiny models and shapes on any device")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one attempt, run by the parent process
    args = parser.parse_args()
    if args.case:
        return report_case(lambda: run_case(json.loads(args.case)))

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.exit(2, "this benchmark measures GPU memory and time: run it on a CUDA GPU, or use --smoke\n")
    models = ["tiny"] if args.smoke else args.models
    resolutions = ["smoke"] if args.smoke else args.resolutions
    sampling_steps, steps = (4, 1) if args.smoke else (args.sampling_steps, args.steps)
    text_tokens = 16 if args.smoke else args.text_tokens
    results = []
    for model in models:
        for resolution in resolutions:
            for method in args.methods:
                for tuning in args.tuning:
                    for sft in args.sft:
                        case = make_case(model, resolution, method, tuning, sft, steps=steps,
                                         sampling_steps=sampling_steps, text_tokens=text_tokens,
                                         ds_config=args.ds_config, smoke=args.smoke)
                        results.append(measure(case, args.case_timeout))
                        print(json.dumps({k: results[-1].get(k) for k in
                                          ("model", "resolution", "method", "tuning", "sft", "status",
                                           "step_time_s", "peak_allocated_gb")}), flush=True)
    report = make_report(results, ds_config=args.ds_config, steps=steps, sampling_steps=sampling_steps,
                         text_tokens=text_tokens, smoke=args.smoke)
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results")
    out = out_dir / f"step-{report['device'].replace(' ', '_')}"
    write_reports(report, out)
    print(f"wrote {out}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
