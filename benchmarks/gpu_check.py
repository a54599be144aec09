"""The first contact with a GPU, in one unattended command that finishes within ten minutes on one H100 or H200 from a
cold start: kernel parity and bandwidth, an SFT step with and without activation offload, PRFL against first-frame
RGB ReFL split by phase, and the measured peak memory next to the memory model's figure.

    python -m benchmarks.gpu_check                 # on the GPU (the first-contact slice)
    python -m benchmarks.gpu_check --dry-run       # the plan: parts, time limits, what each writes; runs nothing
    python -m benchmarks.gpu_check --smoke         # tiny shapes on a CPU, under two minutes (checks the script)
    python -m benchmarks.gpu_check --slice 14b-720p-lora   # one slice of the full PRFL / RGB ReFL matrix

On a GPU machine without deepspeed, diffusers and liger-kernel, fetch their wheels first (`bash ../shared/gpu/
wheels.sh` on a machine with PyPI) and start the command with
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site:$PWD && `.

The first-contact slice (`first-contact`, the default). Two CPU jobs start at once in the background: DeepSpeed's CPU
Adam op is built (the SFT and PRFL steps need it) and the memory model traces the PRFL case (benchmarks/
memory_model.py, CPU only). Then the GPU parts run one after another, each in child processes of its own
(benchmarks/child.py) and each stopped at its own time limit; what a part does not reach is recorded as such:
- kernels: every fused kernel against its PyTorch reference in bf16 at Wan's widths (1.3B at 480P, 14B at 720P
  under sp 8: 9,450 tokens a rank), forward and every gradient within the test suite's tolerances; then their
  forward and forward+backward bandwidth against a measured device copy (benchmarks/kernel_speed.py, no
  torch.compile), each against its target fraction;
- sft: one Wan2.1-1.3B 480P x 81 SFT step with block checkpointing, without and with activation offload
  (benchmarks/sft_step_memory.py);
- prfl: Wan2.1-1.3B 480P x 81 PRFL and first-frame RGB ReFL on a 10-step chain, SFT loss on, a few timed steps
  each split by phase (benchmarks/step_memory_speed.py); an out-of-memory error, while the models are built or in a
  step, is retried with activation offload;
- memory: the measured peak allocated memory of the prfl part's cases next to the memory model's allocator-visible
  figure for the same case (what `torch.cuda.max_memory_allocated` sees: no NCCL buffers, CUDA context or
  headroom), and measured reserved memory next to that plus the model's headroom.
The slices of the full matrix (`--slice NAME`, `--dry-run` lists them) run benchmarks/step_memory_speed.py's cases
of one model, resolution and tuning (3 methods x SFT on / off) within the same ten minutes.
Writes benchmarks/results/gpu_check-<device>.json and .md (with --slice: gpu_check-<slice>-<device>), and the parts'
own reports: kernel_speed-, sft_step- and step-<device>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.child import report_case, run_case_in_child
from benchmarks.cpu_report import cell

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 600  # the whole command, cold start included
MEMORY_CASE = dict(preset="wan2.1-t2v-1.3b", latent=(21, 60, 104), world=1, sp=1, methods=["prfl_sp", "rgb_first"])
SMOKE_MEMORY_CASE = dict(preset="tiny", latent=(3, 4, 6), world=1, sp=1, methods=["prfl_sp", "rgb_first"])


@dataclass
class Part:
    name: str
    limit_s: float  # wall time the part may take; its cases get what is left of it
    runs: str
    writes: str
    cases: list[dict] = field(default_factory=list)


def first_contact(smoke: bool) -> list[Part]:
    from benchmarks.step_memory_speed import make_case

    chain = dict(steps=1, sampling_steps=4, text_tokens=16, smoke=True) if smoke else \
        dict(steps=3, sampling_steps=10)
    return [
        Part("kernels", 60 if smoke else 110, "fused kernels vs PyTorch (bf16, Wan widths): parity, then bandwidth "
             "against a device copy", "kernel_speed-<device>.json / .md"),
        Part("sft", 60 if smoke else 200, "Wan2.1-1.3B 480P x 81 SFT step, checkpointing, without / with "
             "activation offload", "sft_step-<device>.json / .md"),
        Part("prfl", 90 if smoke else 220, "Wan2.1-1.3B 480P x 81: PRFL and first-frame RGB ReFL, 10-step chain, "
             "SFT on, 3 timed steps each, by phase", "step-<device>.json / .md / .png",
             [make_case("1.3b", "480p", method, "full", "on", **chain) for method in ("prfl", "rgb_first")]),
        Part("memory", 0, "measured peak memory of the prfl cases next to the memory model's (traced in the "
             "background on the CPU)", "gpu_check-<device>.json / .md"),
    ]


def matrix_slices() -> dict[str, list[dict]]:
    """The full matrix of benchmarks/step_memory_speed.py, one slice per model, resolution and tuning."""
    from benchmarks.step_memory_speed import MODELS, RESOLUTIONS, TUNING, make_case

    return {f"{model}-{resolution}-{tuning}": [make_case(model, resolution, method, tuning, sft, steps=3,
                                                         sampling_steps=40)
                                               for method in ("prfl", "rgb_first", "rgb_all") for sft in ("on", "off")]
            for model in MODELS for resolution in RESOLUTIONS for tuning in TUNING}


def plan(slice_name: str, smoke: bool) -> list[Part]:
    if slice_name == "first-contact":
        return first_contact(smoke)
    return [Part(slice_name, BUDGET_S - 60, f"{len(cases)} cases of benchmarks.step_memory_speed "
                 "(PRFL / RGB ReFL first / all frames x SFT on / off), 3 timed steps each", "step-<device>.json / .md",
                 cases) for name, cases in matrix_slices().items() if name == slice_name]


def print_plan(parts: list[Part], slice_name: str) -> None:
    print(f"gpu_check, slice {slice_name!r}: at most {BUDGET_S} s in all on one GPU")
    if slice_name == "first-contact":
        print("  background, at once (CPU): build DeepSpeed's CPU Adam op; trace the memory model of "
              f"{MEMORY_CASE['preset']} {'x'.join(map(str, MEMORY_CASE['latent']))} ({', '.join(MEMORY_CASE['methods'])})")
    for part in parts:
        limit = f"{part.limit_s:.0f} s" if part.limit_s else "after the parts above"
        print(f"  {part.name:10s} {limit:>22s}  {part.runs}\n  {'':10s} {'':>22s}  writes {part.writes}")
        for case in part.cases:
            print(f"  {'':35s}- {case['model']} {case['resolution']} {case['method']} {case['tuning']} "
                  f"sft-{case['sft']}")
    print(f"  then writes benchmarks/results/gpu_check{'' if slice_name == 'first-contact' else '-' + slice_name}"
          "-<device>.json / .md; slices of the full matrix: " + ", ".join(matrix_slices()))


# -- the parts, each in a child process --------------------------------------------------------------------------


def kernels_part(case: dict) -> dict:
    import torch

    if not torch.cuda.is_available():  # smoke: Triton's interpreter, set before the kernels import triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks.kernel_speed import CASES, TARGET_FRACTION, parity, run, write_report

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [("small", 48, 33)] if case["smoke"] else [("1.3b-480p", 1536, 32_760), ("14b-720p-sp8", 5120, 9_450)]
    checks = [parity(name, tokens, dim, torch.bfloat16, device) for _, dim, tokens in sizes for name in CASES]
    report = run(case["smoke"], 2 if case["smoke"] else 20, sizes=sizes, blocks=False, dtypes=(torch.bfloat16,),
                 compile_reference=False)
    for row in report["ops"]:
        row["reaches_target"] = row["forward_fraction_of_copy"] >= TARGET_FRACTION["forward"]
    stem = write_report(report, Path(case["out"]))
    return {"status": "ok", "parity": checks, "parity_passed": all(c["passed"] for c in checks),
            "bandwidth": [{k: r[k] for k in ("op", "size", "impl", "forward_fraction_of_copy",
                                                "forward_backward_fraction_of_copy", "reaches_target")}
                          for r in report["ops"]],
            "copy_bandwidth_gbps": report["copy_bandwidth_gbps"], "report": f"{stem}.json"}


def memory_model_part(case: dict) -> dict:
    from benchmarks.memory_model import model, parser

    setting = case["setting"]
    args = parser().parse_args(["--preset", setting["preset"], "--latent", *map(str, setting["latent"]),
                                "--world", str(setting["world"]), "--sp", str(setting["sp"]),
                                "--text-tokens", str(case["text_tokens"]), "--methods", *setting["methods"]])
    args.vae_config, args.clip, args.qwen, args.min_pixels, args.max_pixels = case["frozen_models"]
    report = model(args)
    return {"status": "ok", "rows": report["rows"]}


def build_ops_part(case: dict) -> dict:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    started = time.monotonic()
    CPUAdamBuilder().load(verbose=False)
    return {"status": "ok", "seconds": time.monotonic() - started}


PART_FUNCTIONS = {"kernels": kernels_part, "memory_model": memory_model_part, "build_ops": build_ops_part}


# -- orchestration -----------------------------------------------------------------------------------------------


def torch_adam_config(template: str, out: Path) -> str:
    """A copy of the DeepSpeed config `template` with the optimizer on the GPU as torch's AdamW: what the steps run
    with when DeepSpeed's CPU Adam op cannot be built on this machine (the report says so)."""
    config = json.loads((ROOT / template).read_text())
    config["zero_optimization"].pop("offload_optimizer", None)
    config["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    path = out / "ds_config-torch-adam.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return str(path.resolve())


class Background:
    """A part run in a child process while the GPU parts go on; `result` waits for it (up to a limit, then stops
    it, unless `kill` is off: a JIT build killed midway leaves a lock that hangs every later build) and keeps what it
    got."""

    def __init__(self, case: dict, kill: bool = True) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--case", json.dumps(case)],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.kill, self.outcome = kill, None

    def result(self, timeout: float) -> dict:
        if self.outcome is None:
            try:
                stdout, stderr = self.process.communicate(timeout=max(timeout, 1))
                lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
                self.outcome = json.loads(lines[-1][7:]) if lines else \
                    {"status": f"failed ({self.process.returncode})", "stderr": stderr[-2000:]}
            except subprocess.TimeoutExpired:
                if self.kill:
                    os.killpg(self.process.pid, 9)
                    self.process.communicate()
                self.outcome = {"status": f"not finished within {timeout:.0f} s"}
        return self.outcome


def run_cases(cases: list[dict], deadline: float) -> list[dict]:
    """PRFL / RGB ReFL cases one after another until the deadline; the rest are recorded as not reached."""
    from benchmarks.step_memory_speed import measure

    results = []
    for case in cases:
        left = deadline - time.monotonic()
        if left < 30:
            results.append({**case, "status": "not reached (part time limit)", "attempts": []})
            continue
        results.append(measure(case, left))
        print(json.dumps({k: results[-1].get(k) for k in ("method", "tuning", "sft", "status", "step_time_s",
                                                          "peak_allocated_gb")}), flush=True)
    return results


def compare_memory(measured: list[dict], modelled: dict, optimizer_on_gpu: bool) -> list[dict]:
    """Measured peaks of the prfl part next to the memory model's rows of the same method and offload setting. The
    model traced ds_configs/z3_offload.json; when the steps ran with the optimizer on the GPU instead (CPU Adam did
    not build), its 16 bytes per parameter (8 x the bf16 parameters) are added."""
    allocator_visible = ("parameters_gb", "gradients_and_optimizer_gb", "zero3_gathered_gb", "zero3_reduce_bucket_gb",
                         "frozen_models_gb", "activations_gb", "temporaries_gb")
    method_of = {"prfl": "prfl_sp", "rgb_first": "rgb_first"}
    rows = []
    for result in measured:
        if result.get("status") != "ok":
            continue
        row = next((r for r in modelled.get("rows", []) if r["method"] == method_of[result["method"]]
                    and r["sft"] == result["sft"] and r["activation_offload"] == result["activation_offload"]), None)
        if row is None:
            continue
        visible = sum(row[k] for k in allocator_visible) + (8 * row["parameters_gb"] if optimizer_on_gpu else 0)
        rows.append({"method": result["method"], "activation_offload": result["activation_offload"],
                     "measured_peak_allocated_gb": result["peak_allocated_gb"], "modelled_allocated_gb": visible,
                     "measured_peak_reserved_gb": result["peak_reserved_gb"],
                     "modelled_reserved_gb": visible + row["allocator_headroom_gb"],
                     "modelled_total_gb": row["total_gb"]})
    return rows


def write_summary(report: dict, out: Path) -> Path:
    suffix = "" if report["slice"] == "first-contact" else f"-{report['slice']}"
    stem = out / f"gpu_check{suffix}-{report['device'].replace(' ', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# GPU check on {report['device']} (slice {report['slice']})", "",
             f"`python -m benchmarks.gpu_check{'' if suffix == '' else ' --slice ' + report['slice']}"
             f"{' --smoke' if report['smoke'] else ''}`: "
             f"{report['seconds']:.0f} s of a {BUDGET_S} s budget; torch {report['torch']}."
             + (" DeepSpeed's CPU Adam op did not build: the steps ran with torch's AdamW on the GPU "
                f"({report['ds_config_fallback']})." if report.get("ds_config_fallback") else ""), "",
             "| part | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {p['limit_s']:.0f} |"
              for p in report["parts"]]
    kernels = next((p for p in report["parts"] if p["name"] == "kernels" and "parity" in p), None)
    if kernels:
        lines += ["", f"Kernel parity (bf16, test tolerances): {'all pass' if kernels['parity_passed'] else 'FAILS'}; "
                  f"copy bandwidth {kernels['copy_bandwidth_gbps']:.0f} GB/s.", "",
                  "| op | size | impl | fwd % copy | fwd+bwd % copy | forward reaches its target |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['op']} | {b['size']} | {b['impl']} | {100 * b['forward_fraction_of_copy']:.0f} | "
                  f"{100 * b['forward_backward_fraction_of_copy']:.0f} | {'yes' if b['reaches_target'] else 'no'} |"
                  for b in kernels["bandwidth"]]
    cases = [c for p in report["parts"] for c in p.get("results", [])]
    if cases:
        lines += ["", "| case | status | act. offload | step (s) | rollout | grad fwd | reward | decode | backward | "
                  "optimizer | peak alloc (GB) | peak reserved (GB) |", "|---|---|---|" + "---|" * 9]
        for c in cases:
            phases = c.get("phases_s", {})
            name = f"SFT, {c['case']}" if "case" in c else f"{c['method']} {c['tuning']} sft-{c['sft']}"
            offload = c.get("activation_offload", "offload" in c.get("case", ""))
            lines.append(f"| {name} | {c['status']} | {'on' if offload else 'off'} | "
                         + " | ".join(cell(v) for v in
                                      [c.get("step_time_s"), *(phases.get(p) for p in
                                       ("rollout", "gradient_forward", "reward", "decode", "backward", "optimizer")),
                                       c.get("peak_allocated_gb"), c.get("peak_reserved_gb")]) + " |")
    if report.get("memory"):
        lines += ["", "Measured against modelled (benchmarks/memory_model.py; allocated: without NCCL, CUDA context "
                  "and headroom; reserved: with the headroom), GB:", "",
                  "| method | act. offload | measured allocated | modelled allocated | measured reserved | "
                  "modelled reserved | modelled total |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m['method']} | {'on' if m['activation_offload'] else 'off'} | " + " | ".join(
            cell(m[k]) for k in ("measured_peak_allocated_gb", "modelled_allocated_gb", "measured_peak_reserved_gb",
                                 "modelled_reserved_gb", "modelled_total_gb")) + " |" for m in report["memory"]]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--slice", default="first-contact", help="first-contact (default) or a slice of the matrix")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one part, in a child process
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        return report_case(lambda: PART_FUNCTIONS[case["part"]](case))
    parts = plan(args.slice, args.smoke)
    if not parts:
        parser.exit(2, f"error: --slice {args.slice}: expected first-contact or one of {', '.join(matrix_slices())}\n")
    if args.dry_run:
        print_plan(parts, args.slice)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.exit(2, "gpu_check measures a GPU: run it on a CUDA GPU, or use --smoke (or --dry-run)\n")
    started = time.monotonic()
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.smoke else ROOT / "benchmarks/results")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    background = {}
    if args.slice == "first-contact":
        from benchmarks.memory_model import SMOKE as SMOKE_MODELS
        from engine.config import RGBReFLConfig

        frozen = ([SMOKE_MODELS[k] for k in ("vae_config", "clip", "qwen", "min_pixels", "max_pixels")] if args.smoke
                  else [{}, {}, {}, RGBReFLConfig.min_pixels, RGBReFLConfig.max_pixels])
        background["build_ops"] = Background({"part": "build_ops"}, kill=False)
        background["memory_model"] = Background({"part": "memory_model", "smoke": args.smoke,
                                                 "setting": SMOKE_MEMORY_CASE if args.smoke else MEMORY_CASE,
                                                 "text_tokens": 16 if args.smoke else 512, "frozen_models": frozen})
    report = {"device": device, "slice": args.slice, "smoke": args.smoke, "torch": torch.__version__, "parts": []}
    ds_config = "ds_configs/z3_offload.json"
    for part in parts:
        part_started = time.monotonic()
        deadline = min(part_started + part.limit_s, started + BUDGET_S - 20)
        entry = {"name": part.name, "limit_s": part.limit_s, "status": "ok"}
        if deadline - part_started < 30 and part.limit_s:
            entry["status"] = "not reached (budget spent)"
        elif part.name == "kernels":
            entry.update(run_case_in_child("benchmarks.gpu_check", {"part": "kernels", "smoke": args.smoke,
                                                                    "out": str(out)}, deadline - part_started))
        elif part.name == "sft":
            from benchmarks.sft_step_memory import SMOKE, measure, write_report

            entry["ops"] = background["build_ops"].result(deadline - time.monotonic())
            if entry["ops"].get("status") != "ok":
                report["ds_config_fallback"] = ds_config = torch_adam_config("ds_configs/z3_offload.json", out)
            setting = {"preset": "wan2.1-t2v-1.3b", "latent": [21, 60, 104], "text_tokens": 512,
                       "ds_config": ds_config, "steps": 2, **(SMOKE if args.smoke else {})}
            entry["results"] = measure(setting, deadline - time.monotonic(), deadline)
            write_report({"device": device, **setting, "precision": "bf16" if cuda else "fp32", "gpus": 1,
                          "sp_size": 1, "results": entry["results"]}, out)
        elif part.name == "memory":
            modelled = background["memory_model"].result(started + BUDGET_S - 10 - time.monotonic())
            prfl = next((p for p in report["parts"] if p["name"] == "prfl"), {})
            entry["status"] = modelled.get("status", "failed")
            report["memory"] = compare_memory(prfl.get("results", []), modelled, "ds_config_fallback" in report)
        else:  # the PRFL / RGB ReFL cases of the first-contact slice or of a matrix slice
            from benchmarks.step_memory_speed import make_report, write_reports

            if "build_ops" in background:
                entry["ops"] = background["build_ops"].result(deadline - time.monotonic())
                if entry["ops"].get("status") != "ok":
                    report["ds_config_fallback"] = ds_config = torch_adam_config("ds_configs/z3_offload.json", out)
            entry["results"] = run_cases([{**case, "ds_config": ds_config} for case in part.cases], deadline)
            first = part.cases[0]
            name = "step" if args.slice == "first-contact" else f"step-{args.slice}"
            write_reports(make_report(entry["results"], ds_config=ds_config, steps=first["steps"],
                                      sampling_steps=first["sampling_steps"], text_tokens=first["text_tokens"],
                                      smoke=args.smoke), out / f"{name}-{device.replace(' ', '_')}")
        entry["seconds"] = time.monotonic() - part_started
        if entry.get("status") not in ("ok", None) or any(r.get("status") != "ok" for r in entry.get("results", [])):
            entry["status"] = entry.get("status") if entry.get("status") != "ok" else "partly"
        report["parts"].append(entry)
        print(f"gpu_check: {part.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
    for job in background.values():
        job.result(0)
    report["seconds"] = time.monotonic() - started
    stem = write_summary(report, out)
    print(f"wrote {stem}.json and .md in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
