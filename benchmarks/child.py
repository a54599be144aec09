"""One benchmark case in a child process of its own, as the GPU benchmarks run them: a fresh CUDA context and
allocator per case (so peaks do not mix), a time limit, out-of-memory retried with activation offload.

    result = run_case_in_child("benchmarks.step_memory_speed", case, timeout=600)      # parent
    report_case(lambda: measure(case))                                                  # child, `--case JSON`

The child prints one `RESULT {json}` line. An out-of-memory error anywhere in the child, while the trainer is built
as well as in a step, is reported as `{"status": "OOM", ...}`. A child that prints its result and then does not
exit (a process group that hangs in teardown) keeps its result: the parent waits EXIT_GRACE_S more, then kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "
EXIT_GRACE_S = 30.0


# What a GPU out of memory reads like when it does not come as torch.cuda.OutOfMemoryError (cuBLAS's workspace, a
# kernel's allocation); a failed pinned host allocation (cudaHostAlloc) is host memory and is not retried with offload.
DEVICE_OOM = ("cuda out of memory", "cublas_status_alloc_failed", "outofmemoryerror")


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether an error (or a child's stderr) is the GPU running out of memory."""
    if not isinstance(error, str):
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
    text = str(error).lower()
    return any(marker in text for marker in DEVICE_OOM) and "cudahostalloc" not in text


def report_case(measure: Callable[[], dict]) -> int:
    """In the child: run `measure`, print its result line (or the OOM / error that stopped it); exit status 0."""
    try:
        result = measure()
    except Exception as e:  # reported to the parent, which records it as the case's status
        if not is_out_of_memory(e):
            traceback.print_exc()
        result = {"status": "OOM" if is_out_of_memory(e) else "failed",
                  "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    print(RESULT + json.dumps(result), flush=True)
    return 0


def run_case_in_child(module: str, case: dict, timeout: float) -> dict:
    """`python -m module --case JSON` from the repository root; the child's result, or what stopped it."""
    cmd = [sys.executable, "-m", module, "--case", json.dumps(case)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    result: dict = {}
    stderr: list[str] = []
    finished = threading.Event()

    def read_stdout():
        for line in process.stdout:
            if line.startswith(RESULT):
                result.update(json.loads(line[len(RESULT):]))
                finished.set()

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline and not finished.is_set():
        time.sleep(0.2)
    if finished.is_set():
        try:
            process.wait(EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            result["note"] = f"the child printed its result but did not exit within {EXIT_GRACE_S:.0f} s; killed"
    try:  # the whole group: a rank or compiler the child started must not outlive it
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    for reader in readers:
        reader.join(5)
    if result:
        return result
    if process.returncode is not None and time.monotonic() < deadline:
        tail = "".join(stderr)[-2000:]
        return {"status": "OOM" if is_out_of_memory(tail) else f"failed ({process.returncode})", "stderr": tail}
    return {"status": f"timeout ({timeout:.0f} s)", "stderr": "".join(stderr)[-2000:]}


def with_offload_retry(module: str, case: dict, timeout: float, retry: bool = True) -> dict:
    """The case without activation offload and, if that runs out of memory, again with it, all within `timeout`
    seconds. Returns the case with the result of its last attempt, `activation_offload` as that attempt ran, and
    every attempt's status."""
    attempts, end = [], time.monotonic() + timeout
    for offload in (False, True) if retry else (case.get("offload", False),):
        started = time.monotonic()
        if attempts and end - started < 10:
            result, offload = {"status": "OOM (no time left to retry with activation offload)"}, False
            break
        result = run_case_in_child(module, {**case, "offload": offload}, end - started)
        attempts.append({"activation_offload": offload, "status": result.get("status"),
                         "seconds": round(time.monotonic() - started, 1)})
        if result.get("status") != "OOM":
            break
    return {**case, **result, "activation_offload": offload, "attempts": attempts}
