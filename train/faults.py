"""Fault injection for tests: lets a test kill a rank at an exact step instead of racing a timer.

Inert unless `REPARAM_FAULT_KILL_AT_STEP=N` is set in the environment: then rank
`REPARAM_FAULT_KILL_RANK` (default 0) sends itself SIGKILL right after optimizer step N and its checkpoint, if
one falls on N, exactly as `kill -9` from outside would.
"""

import os
import signal

_KILL_AT_STEP = int(os.environ.get("REPARAM_FAULT_KILL_AT_STEP", "0"))
_KILL_RANK = int(os.environ.get("REPARAM_FAULT_KILL_RANK", "0"))


def after_step(step: int, rank: int) -> None:
    if _KILL_AT_STEP and step == _KILL_AT_STEP and rank == _KILL_RANK:
        os.kill(os.getpid(), signal.SIGKILL)
