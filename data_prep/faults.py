"""The one fault point for tests: lets a test hit a process at an exact place instead of racing a timer.

Product code calls it only behind `if faults.ACTIVE:`, a module constant that is False unless one of the variables
below is set, so it costs one attribute read where it is placed and nothing else. It lives in data_prep (which
imports neither torch nor train) so that data_prep and train share it.

- `REPARAM_FAULT_AT_STEP=N`: rank `REPARAM_FAULT_RANK` (default 0) of a training run sends itself
  `REPARAM_FAULT_SIGNAL` (default KILL; USR1 and TERM exercise preemption), exactly as `kill -s <signal>` from
  outside would, at `REPARAM_FAULT_PHASE`: `after_step` (default: right after step N and its checkpoint, so a
  preemption signal is acted on at the end of step N + 1) or `in_save` (while the checkpoint of step N is being
  written, after DeepSpeed wrote its files and before the checkpoint is complete).
- `REPARAM_FAULT_NAN_BATCHES=E:W,...`: rank 0's loss becomes NaN on the global batch that starts at window W of
  epoch E (the sampler's `step_start`): a bad batch, tied to the data rather than to the step counter, as a real one
  would be.
- `REPARAM_FAULT_UNIT_DELAY=S`: each data_prep work unit sleeps S seconds after writing its part, so that a test
  can interrupt a run between units.
"""

import os
import signal
import time

_AT_STEP = int(os.environ.get("REPARAM_FAULT_AT_STEP", "0"))
_RANK = int(os.environ.get("REPARAM_FAULT_RANK", "0"))
_SIGNAL = signal.Signals[f"SIG{os.environ.get('REPARAM_FAULT_SIGNAL', 'KILL')}"]
_PHASE = os.environ.get("REPARAM_FAULT_PHASE", "after_step")
_NAN_BATCHES = {tuple(int(n) for n in b.split(":")) for b in os.environ.get("REPARAM_FAULT_NAN_BATCHES", "").split(",")
                if b}
_UNIT_DELAY = float(os.environ.get("REPARAM_FAULT_UNIT_DELAY", "0") or 0)

ACTIVE = bool(_AT_STEP or _NAN_BATCHES or _UNIT_DELAY)


def at_step(phase: str, step: int, rank: int) -> None:
    """Signal this process if it is the configured rank at the configured phase of the configured step."""
    if _AT_STEP and phase == _PHASE and step == _AT_STEP and rank == _RANK:
        os.kill(os.getpid(), _SIGNAL)


def poison(loss, batch_start: tuple[int, int], rank: int):
    """`loss`, or NaN when rank 0 trains the global batch starting at `batch_start` = (epoch, window) named in
    REPARAM_FAULT_NAN_BATCHES."""
    return loss * float("nan") if rank == 0 and tuple(batch_start) in _NAN_BATCHES else loss


def unit_done() -> None:
    """A data_prep work unit wrote its part."""
    if _UNIT_DELAY:
        time.sleep(_UNIT_DELAY)
