"""Where the ranks run: (host, ranks on that host) pairs from a hostfile, a comma-separated list, or Slurm."""

from __future__ import annotations

import os
import re
import subprocess


class LaunchError(ValueError):
    """Bad launcher input; printed as one `error: ...` line."""


Hosts = list[tuple[str, int]]


def from_hostfile(path: str) -> Hosts:
    """MPI-style lines `host slots=N` (DeepSpeed's format); `#` starts a comment."""
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise LaunchError(f"--hostfile: cannot read {path}: {exc.strerror}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=([1-9]\d*)", line)
        if not match:
            raise LaunchError(f"--hostfile {path} line {number}: expected 'HOST slots=N', got {line!r}")
        hosts.append((match[1], int(match[2])))
    return _checked(hosts, f"--hostfile {path}")


def from_list(text: str, nproc: int) -> Hosts:
    return _checked([(host, nproc) for host in text.split(",") if host], "--nodes")


def from_slurm(environ: dict, nproc: int) -> Hosts:
    """The allocation's nodes, in Slurm's order (the batch script runs on the first one)."""
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("--nodes slurm: SLURM_JOB_NODELIST is not set; run inside an allocation (sbatch/salloc)")
    names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return _checked([(host, nproc) for host in names.stdout.split()], f"SLURM_JOB_NODELIST={nodelist}")


def write_hostfile(hosts: Hosts, path) -> None:
    """Create `path` (it must not exist; a link there is not followed) readable by this user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "w") as f:
        f.write("".join(f"{host} slots={slots}\n" for host, slots in hosts))


def _checked(hosts: Hosts, source: str) -> Hosts:
    if not hosts:
        raise LaunchError(f"{source}: no hosts")
    names = [host for host, _ in hosts]
    duplicates = sorted({host for host in names if names.count(host) > 1})
    if duplicates:
        raise LaunchError(f"{source}: host listed twice: {', '.join(duplicates)}")
    return hosts
