"""Run DeepSpeed's launcher (or srun) as a child and turn SIGUSR1/SIGTERM into a preemption request for the ranks.

DeepSpeed's launchers die on SIGUSR1 and kill their ranks on SIGTERM, so the child starts with both signals
ignored (inherited across exec; the trainer installs its own handlers) and this process forwards them as SIGUSR1:
to every local rank process, or to srun, which relays it to the launcher on every node.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psutil

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _ignore_preemption_signals() -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def signal_ranks(child: subprocess.Popen, entry: str) -> int:
    """SIGUSR1 to every descendant running `entry` (train/main.py); returns how many were signalled."""
    sent = 0
    for proc in psutil.Process(child.pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
            if len(cmdline) > 2 and cmdline[2] == entry:  # [python, -u, entry, ...], not the rank wrapper
                proc.send_signal(signal.SIGUSR1)
                sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def run(command: list[str], env: dict, forward) -> int:
    """Run `command`; on SIGUSR1/SIGTERM call `forward(child)`. Returns the child's exit code."""
    child = subprocess.Popen(command, env=env, preexec_fn=_ignore_preemption_signals)

    def handle(signum, frame):
        print(f"launcher: {signal.Signals(signum).name} at {time.strftime('%H:%M:%S')}, "
              f"{forward(child)}", flush=True)

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, handle)
    return child.wait()
