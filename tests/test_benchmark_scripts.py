"""Every benchmark script's smoke run, launched exactly as its docstring says (`python -m benchmarks.<name> --smoke
...` from the repository root), and what its report then holds. Figures are never asserted: only that the run
works, measured what it says and wrote its report."""

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, build_deepspeed_ops

# Scripts that are not benchmarks of their own (helpers), and the one whose full run is its test
# (tests/test_kernel_compile.py): it has no smoke mode.
HELPERS = {"__init__", "child", "cpu_report", "kernel_launches"}
NO_SMOKE = {"kernel_compile"}
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in HELPERS | NO_SMOKE)


def smoke_commands(name: str) -> list[list[str]]:
    """The docstring's command lines that run `--smoke` (continuation lines joined, comments dropped)."""
    docstring = ast.get_docstring(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text()))
    text = re.sub(r"\\\n\s*", " ", docstring)
    commands = []
    for line in text.splitlines():
        line = line.split("#")[0].strip().strip("`")
        if line.startswith(f"python -m benchmarks.{name}") and "--smoke" in line.split():
            commands.append(shlex.split(line))
    return commands


def written(stdout: str) -> Path:
    """The report stem a script announces with `wrote STEM.json ...`."""
    match = re.search(r"^wrote (\S+)\.json", stdout, re.MULTILINE)
    assert match, f"the script did not say where its report is:\n{stdout[-2000:]}"
    return Path(match.group(1))


def report(stem: Path) -> dict:
    return json.loads(Path(f"{stem}.json").read_text())


def check_step_memory_speed(stem: Path) -> None:
    results = report(stem)["results"]
    assert [(r["method"], r["status"]) for r in results] == [("prfl", "ok"), ("rgb_all", "ok")]
    assert set(results[1]["phases_s"]) >= {"rollout", "gradient_forward", "reward", "decode", "backward"}
    assert Path(f"{stem}.md").read_text().count("| tiny | smoke |") == 2
    assert Path(f"{stem}.png").stat().st_size > 0


def check_memory_model(stem: Path) -> None:
    data = report(stem)
    rows = data["rows"]
    assert [(r["method"], r["activation_offload"]) for r in rows] == [
        (m, offload) for m in ("prfl", "prfl_sp", "rgb_first", "rgb_all") for offload in (False, True)]
    for row in rows:  # offload parks the checkpointed block inputs on the host, and only then
        assert (row["host_activations_gb"] > 0) == row["activation_offload"]
        terms = ("parameters_gb", "gradients_and_optimizer_gb", "zero3_gathered_gb", "zero3_reduce_bucket_gb",
                 "frozen_models_gb", "activations_gb", "temporaries_gb", "nccl_gb", "cuda_context_gb",
                 "allocator_headroom_gb")
        assert row["total_gb"] == pytest.approx(sum(row[t] for t in terms))
        for gpu, capacity in data["gpus_gb"].items():
            assert row[f"fits_{gpu}"] == (row["total_gb"] <= capacity)


def check_pavrm_probe(stem: Path) -> None:
    assert [(r["trunk"], r["task"]) for r in report(stem)["rows"]] == [
        (patch, task) for patch in ("1,2,2", "2,2,2")
        for task in ("smooth vs static", "smooth vs jitter", "smooth vs vanish", "all four")]
    assert Path(f"{stem}.md").read_text().count("| 2,2,2 |") == 4


def check_pavrm_accuracy(stem: Path) -> None:
    runs = report(stem)["runs"]
    assert [(run["loss"], run["step"]) for run in runs] == [("ce", 2), ("bt", 2)]
    assert all(0 <= run["accuracy (0.6,0.8]"] <= 1 for run in runs)
    table = Path(f"{stem}.md").read_text()
    assert "| ce |" in table and "| bt |" in table and "(0.6,0.8]" in table


def check_prfl_stages(stem: Path) -> None:
    runs = report(stem)["runs"]
    assert [(run["stage"], run["before"]["step"], run["after"]["step"]) for run in runs] == [
        ("all", 0, 2), ("last_quarter", 0, 2)]
    table = Path(f"{stem}.md").read_text()
    assert "| base |" in table and "| all |" in table and "| last_quarter |" in table


def check_prfl_i2v(stem: Path) -> None:
    data = report(stem)
    assert set(data["runs"]) == {"recipe", "SFT alone"}
    for run in data["runs"].values():
        assert (run["before"]["step"], run["after"]["step"]) == (0, 2)
        for when in ("before", "after"):
            assert run[when]["first_frame_rate_ci95_low"] <= run[when]["first_frame_rate"] <= \
                run[when]["first_frame_rate_ci95_high"]
    assert data["rendered"]["pass_rate"] == 1.0 and data["rendered"]["first_frame_rate"] == 1.0
    table = Path(f"{stem}.md").read_text()
    assert "| first frame kept |" in table and "| judge pass |" in table and "| rendered |" in table


def check_pavrm_shift(stem: Path) -> None:
    data = report(stem)
    assert [row["speed_px_per_frame"] for row in data["rendered"]][0] == 0.0
    assert all(row["median_logit"] is not None for row in data["rendered"])
    base, repeat = data["generators"]
    assert (base["name"], repeat["name"]) == ("base", "repeat")
    assert base == {**repeat, "name": "base"}  # the same generator on the same pairs: the same figures
    assert "| base |" in Path(f"{stem}.md").read_text()


def check_kernel_speed(stem: Path) -> None:
    data = report(stem)
    assert {(r["op"], r["impl"]) for r in data["ops"]} == {
        (op, impl) for op in ("rms_norm", "modulated_layer_norm", "residual_modulated_layer_norm", "rope")
        for impl in ("triton", "eager")}
    assert len(data["blocks"]) == 1


def check_sft_step_memory(stem: Path) -> None:
    assert [(r["case"], r["status"]) for r in report(stem)["results"]] == [
        ("checkpointing", "ok"), ("checkpointing+offload", "ok")]


def check_gpu_check(stem: Path) -> None:
    data = report(stem)
    assert [(p["name"], p["status"]) for p in data["parts"]] == [
        ("kernels", "ok"), ("sft", "ok"), ("prfl", "ok"), ("memory", "ok")]
    kernels = data["parts"][0]
    assert kernels["parity_passed"] and len(kernels["parity"]) == 4
    assert [m["method"] for m in data["memory"]] == ["prfl", "rgb_first"]  # modelled beside each measured case
    for part_report in ("kernel_speed-cpu-interpreter", "sft_step-cpu", "step-cpu"):  # each part's own report
        assert (stem.parent / f"{part_report}.json").exists(), part_report


CHECKS = {name[len("check_"):]: function for name, function in globals().items() if name.startswith("check_")}


def test_every_benchmark_script_is_covered():
    assert set(SCRIPTS) == set(CHECKS), "a benchmark script without a smoke check, or a check without a script"


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_run_works_as_its_docstring_says(name):
    commands = smoke_commands(name)
    assert len(commands) == 1, f"benchmarks/{name}.py: expected one `--smoke` command line in its docstring"
    build_deepspeed_ops()  # CPU Adam for the scripts that train, built once (and cached) before they start
    done = subprocess.run([sys.executable, *commands[0][1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    CHECKS[name](written(done.stdout))


def test_pavrm_shift_names_a_missing_reward_folder(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "benchmarks.pavrm_shift", "--reward", str(tmp_path / "nowhere"),
                              "--generator", f"base={tmp_path}", "--smoke"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "--reward: " in missing.stderr and "nowhere is not a folder" in missing.stderr


def test_gpu_check_prints_its_plan_without_running_anything():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for part in ("kernels", "sft", "prfl", "memory"):
        assert re.search(rf"^\s+{part}\s+", done.stdout, re.MULTILINE), part
    assert "writes kernel_speed-<device>" in done.stdout and "14b-720p-lora" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--slice", "nowhere", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--slice nowhere" in bad.stderr
