"""The training precision: `train.precision: auto` resolved for the hardware at hand, and the one precision→dtype map.

auto picks
- on CUDA: bf16 where the device supports it, else fp16 (DeepSpeed's dynamic loss scaling);
- on CPU: bf16 only where bf16 matmuls are fast here, else fp32. On x86 the CPU flags decide: without AVX512-BF16
  or AMX-BF16, torch's bf16 matmul falls back to a slow path (0.22 GFLOP/s against ~90 for fp32 on a 2-core AMD
  EPYC with AVX2 only: a run 30x slower); with them oneDNN runs bf16 at about twice fp32 (~200 GFLOP/s per core on
  an AMD EPYC with AVX512-BF16). Flags give the same answer on every run of a machine, where a timing can flip on a
  busy one. Elsewhere (ARM, or flags that cannot be read) a short matmul probe compares bf16 with fp32 on this
  process's threads: bf16 is chosen when it is at least `FAST_BF16_RATIO` times faster, since mixed precision adds
  casts and fp32 master weights that only a clearly faster matmul pays for.

An explicit bf16/fp16/fp32 wins, with two exceptions: fp16 on CPU is an error (DeepSpeed's CPU accelerator has no
fp16), and bf16 on a CUDA device without bf16 is an error; bf16 forced on a CPU without fast bf16 runs, with a
warning giving the probe's figures. A resumed run keeps the precision its checkpoint was trained in (`agree`).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONCRETE = tuple(DTYPES)  # what `auto` resolves to
FAST_BF16_RATIO = 1.5  # bf16 matmul FLOP/s over fp32's above which bf16 is worth it on CPU
PROBE_SIZE = 256  # small: one 256² bf16 matmul takes 0.15 s on a CPU without bf16 support
PROBE_SECONDS = 0.05  # per dtype and round; the best of PROBE_ROUNDS interleaved rounds resists a busy neighbour
PROBE_ROUNDS = 3
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a concrete precision (bf16, fp16, fp32)."""
    return DTYPES[precision]


@dataclass(frozen=True)
class Choice:
    """A resolved precision and why it was chosen."""

    precision: str  # bf16, fp16 or fp32
    requested: str  # what train.precision said (auto, or the explicit value)
    reason: str
    warning: str = ""  # printed at start when non-empty (bf16 forced on a CPU where it is slow)

    @property
    def peak_precision(self) -> str:
        """The precision whose matmul peak bounds this run's matmuls, for MFU: the run's own, except bf16 on a CPU
        that is slow at it, where fp32 matmuls (attention runs in fp32 on CPU) are the faster ones."""
        return "fp32" if self.precision == "bf16" and self.warning else self.precision

    def as_dict(self) -> dict:
        return {"precision": self.precision, "requested": self.requested, "reason": self.reason}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags on Linux x86 (/proc/cpuinfo), or None where they cannot be read that way."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of back-to-back n x n matmuls in `dtype` on `device` for about `seconds`, after one warm-up (also
    train.flops' peak probe)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    count, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * n ** 3 * count / elapsed


def probe_cpu_bf16() -> tuple[float, float]:
    """(bf16, fp32) matmul FLOP/s of a 256² matmul on this process's threads, best of interleaved rounds."""
    cpu = torch.device("cpu")
    best = {torch.bfloat16: 0.0, torch.float32: 0.0}
    for _ in range(PROBE_ROUNDS):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_rate(cpu, dtype, PROBE_SIZE, PROBE_SECONDS))
    return best[torch.bfloat16], best[torch.float32]


def cpu_bf16_is_fast() -> tuple[bool, str]:
    """Whether bf16 training pays off on this CPU, and the evidence in words."""
    flags = _cpu_flags()
    if flags is not None:
        present = sorted(flags & set(X86_BF16_FLAGS))
        if present:
            return True, f"CPU flags: {', '.join(present)} (native bf16 matmuls)"
        return False, f"CPU flags: no {' or '.join(X86_BF16_FLAGS)} (bf16 matmuls would run on a slow fallback)"
    ratio, figures = _probe_figures()
    return ratio >= FAST_BF16_RATIO, figures


def _probe_figures() -> tuple[float, str]:
    """(bf16 / fp32 matmul speed, the probe's figures in words)."""
    bf16, fp32 = probe_cpu_bf16()
    return bf16 / fp32, (f"bf16 matmul {bf16 / 1e9:.1f} GFLOP/s vs fp32 {fp32 / 1e9:.1f} GFLOP/s on "
                         f"{torch.get_num_threads()} thread(s), ratio {bf16 / fp32:.2f}")


def resolve(requested: str, device: torch.device) -> Choice:
    """The precision to train in on `device` for `train.precision: requested` (auto, bf16, fp16 or fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            if bf16_ok:
                return Choice("bf16", requested, f"auto: {name} supports bf16")
            return Choice("fp16", requested, f"auto: {name} has no bf16; fp16 with dynamic loss scaling")
        if requested == "bf16" and not bf16_ok:
            raise ConfigError(f"train.precision: bf16 is not supported by {name}; use auto (fp16 with loss "
                              "scaling here) or fp16")
        return Choice(requested, requested, f"set in the config ({name})")
    if requested == "fp16":
        raise ConfigError("train.precision: fp16 cannot run on CPU (DeepSpeed's CPU accelerator has no fp16); use "
                          "auto (bf16 where this CPU is fast at it, else fp32), bf16 or fp32")
    if requested == "fp32":
        return Choice("fp32", requested, "set in the config")
    fast, evidence = cpu_bf16_is_fast()
    if requested == "auto":
        return Choice("bf16" if fast else "fp32", requested, f"auto: {evidence}")
    if fast:
        return Choice("bf16", requested, f"set in the config; {evidence}")
    if evidence.startswith("CPU flags"):  # the warning gives measured figures either way
        evidence = f"{evidence}; {_probe_figures()[1]}"
    return Choice("bf16", requested, f"set in the config; {evidence}",
                  f"warning: train.precision is bf16 but this CPU is slow at it ({evidence}); expect a much slower "
                  "run than with auto or fp32")


def with_precision(cfg, precision: str):
    """`cfg` (a train.config.Config) with train.precision set to the concrete `precision`."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def check_runnable(precision: str, device: torch.device, checkpoint: str) -> str:
    """A resumed run keeps its checkpoint's precision: '' if `device` can run it, a warning if it runs slowly here;
    a ConfigError naming both when it cannot run here at all."""
    try:
        choice = resolve(precision, device)
    except ConfigError as exc:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
        raise ConfigError(f"cannot resume {checkpoint}: it was trained in {precision}, which {where} cannot run "
                          f"({str(exc).removeprefix('train.precision: ')}); resume on hardware that runs "
                          f"{precision}, or start a new run (another run.name)") from None
    return choice.warning


def agree(requested: str, trained: tuple[str, object] | None, device: torch.device) -> Choice:
    """Collective: the precision every rank trains in. Rank 0 resolves `requested` for this hardware, or keeps
    `trained` = (precision, checkpoint) of the checkpoint a run resumes (`auto` only: an explicit precision that
    differs from the checkpoint's fails in train.resume.check_compatible), and every rank takes its answer, so that
    all ranks train in one precision or fail together. The warning of a slow choice is printed once."""
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            if trained and requested == "auto":
                precision, checkpoint = trained
                warning = check_runnable(precision, device, str(checkpoint))
                answer[0] = Choice(precision, requested, f"kept from {checkpoint} (a resumed run keeps the "
                                   "precision it was trained in)", warning)
            else:
                answer[0] = resolve(requested, device)
        except ConfigError as exc:
            answer[0] = str(exc)
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise ConfigError(answer[0])
    if answer[0].warning and dist.get_rank() == 0:
        print(answer[0].warning, file=sys.stderr, flush=True)
    return answer[0]
