"""Process-group start-up shared by the trainer and the HF baseline in bench/."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

SHM_KERNEL = "deepspeed_shm_comm"


def skip_cpu_shm_kernel() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce kernel in every process it starts.
    On a fresh 2-core machine that g++ run takes over 10 minutes (measured), and a run killed during it leaves the
    build lock behind. Training never calls the kernel (it serves DeepSpeed's inference all-reduce only; gradients go
    through torch.distributed/gloo either way), so it is marked unavailable before the backend starts. DeepSpeed
    caches `__compatible_ops__` as one module-level dict (deepspeed/ops/__init__.py), so the edit persists."""
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_KERNEL] = False


def single_process_defaults() -> None:
    """`python train/main.py` without a launcher: one rank on this machine, its rendezvous on loopback. Without
    RANK/WORLD_SIZE DeepSpeed would try MPI discovery and fail with a traceback (no mpi4py). A launcher (deepspeed,
    torchrun, srun through ours) or mpirun sets them, and then nothing here applies."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def init_distributed(timeout_s: int) -> None:
    skip_cpu_shm_kernel()
    single_process_defaults()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
