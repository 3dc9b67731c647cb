"""`python -m launcher --config X.yaml [--nproc N] [--dry-run] [section.key=value ...]`

Starts `train/main.py` on this machine with N ranks through DeepSpeed's launcher, on a free port, and gives each rank
an equal share of the CPU cores (OMP_NUM_THREADS = cores / N unless already set): ranks that each start one
thread per core oversubscribe the machine. Prints the exact command (and its environment additions) before running
it; `--dry-run` prints only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

ENTRY = Path(__file__).resolve().parent.parent / "train" / "main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def build_command(config: str, nproc: int, overrides: list[str], port: int) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(port), str(ENTRY), "--config", config,
            *overrides]


def rank_environment(nproc: int, environ: dict) -> dict:
    """Variables added to every rank's environment."""
    extra = {}
    if "OMP_NUM_THREADS" not in environ:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--nproc", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    parser.add_argument("--dry-run", action="store_true", help="print the command without running it")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides passed to train/main.py")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    command = build_command(args.config, args.nproc, args.overrides, free_port())
    extra = rank_environment(args.nproc, os.environ)
    print(" ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, command)]), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command, env={**os.environ, **extra})


if __name__ == "__main__":
    sys.exit(main())
