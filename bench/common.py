"""Helpers the bench scripts share: a free port, the CPU they ran on, waiting for a quiet machine, and running a
command with its wall time and the CPU that other work on the machine took meanwhile."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_description() -> str:
    """lscpu's model name, cores, and whether the CPU flags have avx512_bf16 (what train.precision auto reads)."""
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    bf16 = "avx512_bf16" in flags
    return f"{model}, {os.cpu_count()} cores, avx512_bf16 {'yes' if bf16 else 'no'}"


def wait_for_quiet(max_load: float, max_wait: float, label: str) -> float:
    """Wait (polling every 10 s, at most max_wait s) until the 1-minute load average is <= max_load; the load then."""
    start = time.monotonic()
    load = os.getloadavg()[0]
    if load > max_load:
        print(f"[{label}] load {load:.2f} > {max_load}: waiting up to {max_wait:.0f}s for the machine to quieten",
              flush=True)
    while load > max_load and time.monotonic() - start < max_wait:
        time.sleep(10)
        load = os.getloadavg()[0]
    waited = time.monotonic() - start
    state = "ok" if load <= max_load else f"STILL BUSY after {waited:.0f}s: figures are contended"
    print(f"[{label}] load average {load:.2f} before the run ({state}; waited {waited:.0f}s)", flush=True)
    return load


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes, /proc/stat), or None where unreadable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user nice system idle iowait irq softirq steal


def children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the ranks the launcher waited for
    return r.ru_utime + r.ru_stime


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: int) -> dict:
    """Run `cmd` from the project root, output to log_path. Returns wall seconds, start and end time.time(), the CPU
    seconds of the command (with its children) and of everything else on the machine meanwhile ("others": another
    session's tests running alongside show up here)."""
    print(f"  $ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    busy0, ours0 = busy_cpu_seconds(), children_cpu_seconds()
    t0, w0 = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall, w1 = time.perf_counter() - t0, time.time()
    busy1, ours1 = busy_cpu_seconds(), children_cpu_seconds()
    if proc.returncode != 0:
        sys.exit(f"error: exit code {proc.returncode} (log {log_path}):\n{log_path.read_text()[-6000:]}")
    cpu = ours1 - ours0
    others = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu)
    return {"wall": wall, "start": w0, "end": w1, "cpu": cpu, "others_cpu": others}


def contention(run: dict) -> str:
    others = run["others_cpu"]
    return ("other work: unknown" if others is None else
            f"other work on the machine meanwhile {others:.1f} CPU-s ({others / run['wall']:.2f} cores)")
