"""Preemption: a signal asks the run to checkpoint and exit so the scheduler can requeue it.

SIGUSR1 (Slurm's `--signal=USR1@lead`) or SIGTERM (what schedulers and DeepSpeed's launcher send before SIGKILL)
only sets a flag; the handler does no I/O, so a second signal arriving during the save changes nothing. Ranks may
receive the signal at different times (or only one of them at all), so the trainer all-reduces the flag at every
step boundary: if any rank was signalled, all of them save the same step and exit with `train.exit_codes.PREEMPTED`.
"""

from __future__ import annotations

import signal
import time

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self):
        self.received: str | None = None
        self.received_at: float | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum).name, time.time()
