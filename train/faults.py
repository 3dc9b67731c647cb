"""Fault injection for tests: lets a test signal a rank at an exact point instead of racing a timer.

Inert unless `REPARAM_FAULT_AT_STEP=N` is set: then rank `REPARAM_FAULT_RANK` (default 0) sends itself
`REPARAM_FAULT_SIGNAL` (default KILL; USR1 and TERM exercise preemption), exactly as `kill -s <signal>` from
outside would, at `REPARAM_FAULT_PHASE`:
- `after_step` (default): right after optimizer step N and its checkpoint, if one falls on N;
- `in_save`: in the middle of saving the checkpoint of step N, after DeepSpeed wrote its files and before the
  checkpoint is complete.
"""

import os
import signal

_AT_STEP = int(os.environ.get("REPARAM_FAULT_AT_STEP", "0"))
_RANK = int(os.environ.get("REPARAM_FAULT_RANK", "0"))
_SIGNAL = signal.Signals[f"SIG{os.environ.get('REPARAM_FAULT_SIGNAL', 'KILL')}"]
_PHASE = os.environ.get("REPARAM_FAULT_PHASE", "after_step")


def inject(phase: str, step: int, rank: int) -> None:
    if _AT_STEP and phase == _PHASE and step == _AT_STEP and rank == _RANK:
        os.kill(os.getpid(), _SIGNAL)
