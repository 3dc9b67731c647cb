"""Process-group start-up shared by the trainer and the HF baseline in bench/."""

from __future__ import annotations

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


def init_distributed(timeout_s: int) -> None:
    skip_cpu_shm_kernel()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
