"""Process start-up: the process group (shared by the trainer and the HF baseline in bench/) and the host settings
a training process runs best with."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
from datetime import timedelta

import deepspeed
import deepspeed.ops
import torch
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


def set_cpu_threads() -> None:
    """On CPU, ranks on one host share its cores; without a limit each rank starts one thread per core and they
    thrash. An explicit OMP_NUM_THREADS (set by the user or the launcher) wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def keep_freed_memory() -> None:
    """On CPU with glibc, keep freed memory in the heap instead of returning it to the OS. Activations and logits
    of a step are tens of MB each; glibc serves such blocks with mmap and unmaps them on free, so every step
    page-faults (and zeroes) all of them again: ~18% of a GPT-2 step on the bench machine. The resident size
    stays at its high-water mark plus heap fragmentation instead of falling back between steps: about twice the
    live peak `python -m launcher plan` predicts, on the quick-start model."""
    libc = ctypes.util.find_library("c")
    if torch.cuda.is_available() or not libc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # an explicit glibc setting wins (launcher.plan's probe measures live memory that way)
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None)  # glibc only (not musl, not macOS)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 1 << 30)
        mallopt(m_trim_threshold, 1 << 30)


def start_training_process(collective_timeout_s: int) -> tuple[int, int]:
    """Join the process group and tune the host for training; (rank, world size)."""
    init_distributed(collective_timeout_s)
    set_cpu_threads()
    keep_freed_memory()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
