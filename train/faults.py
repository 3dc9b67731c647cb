"""Fault injection for tests: lets a test hit a rank at an exact point instead of racing a timer.

Inert unless these variables are set:
- `REPARAM_FAULT_AT_STEP=N`: rank `REPARAM_FAULT_RANK` (default 0) sends itself `REPARAM_FAULT_SIGNAL` (default
  KILL; USR1 and TERM exercise preemption), exactly as `kill -s <signal>` from outside would, at
  `REPARAM_FAULT_PHASE`: `after_step` (default, right after step N and its checkpoint, so a preemption signal is acted on at the end of
  step N + 1) or `in_save` (while the
  checkpoint of step N is being written, after DeepSpeed wrote its files and before the checkpoint is complete).
- `REPARAM_FAULT_NAN_STEPS=6,7`: rank 0's loss becomes NaN on the global batches that an uninterrupted run trains
  at those steps: a bad batch, tied to the data rather than to the step counter, as a real one would be.
"""

import os
import signal

_AT_STEP = int(os.environ.get("REPARAM_FAULT_AT_STEP", "0"))
_RANK = int(os.environ.get("REPARAM_FAULT_RANK", "0"))
_SIGNAL = signal.Signals[f"SIG{os.environ.get('REPARAM_FAULT_SIGNAL', 'KILL')}"]
_PHASE = os.environ.get("REPARAM_FAULT_PHASE", "after_step")
_NAN_STEPS = [int(s) for s in os.environ.get("REPARAM_FAULT_NAN_STEPS", "").split(",") if s]


def inject(phase: str, step: int, rank: int) -> None:
    if _AT_STEP and phase == _PHASE and step == _AT_STEP and rank == _RANK:
        os.kill(os.getpid(), _SIGNAL)


def poison(loss, sampler, rank: int):
    """`loss`, or NaN when this is one of the REPARAM_FAULT_NAN_STEPS batches (on rank 0)."""
    if rank != 0 or not _NAN_STEPS:
        return loss
    steps_per_epoch = sampler.num_windows // sampler.global_batch
    bad = {((s - 1) // steps_per_epoch, (s - 1) % steps_per_epoch * sampler.global_batch) for s in _NAN_STEPS}
    return loss * float("nan") if sampler.step_start in bad else loss
