"""One rank: `python launcher/rank.py train/main.py ARGS...` runs the script and names the rank if it fails.

DeepSpeed's per-node launcher only says that *a* process failed, then kills the others; this wrapper sits between
it and each rank so the log says which rank died and how (exit code or signal). Exit codes pass through; death by
a signal becomes 128 + signal, a positive code that DeepSpeed's launchers propagate (they drop negative ones).
A rank that saved a preemption checkpoint (exit 75) leaves a marker in $REPARAM_RANK_STATUS_DIR: when SIGTERM
reaches every process (Slurm's preemption or time limit), DeepSpeed's launcher exits 1 whatever its ranks did, and
the marker lets our launcher still report 75 so the job is requeued.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts launcher/ first on sys.path; the project root is what `train` is imported from.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train.exit_codes import OK, PREEMPTED  # noqa: E402  (imports nothing: this wrapper never loads torch)


def main() -> int:
    # The child inherits this process's dispositions (USR1 and TERM ignored by the launcher above it), so a
    # signal sent to the whole process tree before the trainer installs its handlers cannot kill it.
    child = subprocess.Popen([sys.executable, "-u", *sys.argv[1:]])
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    if code == PREEMPTED and os.environ.get("REPARAM_RANK_STATUS_DIR"):
        open(os.path.join(os.environ["REPARAM_RANK_STATUS_DIR"], f"preempted-rank{os.environ.get('RANK')}"),
             "w").close()
    if code in (OK, PREEMPTED):
        return code
    how = f"died from {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    print(f"launcher: rank {os.environ.get('RANK')} (local rank {os.environ.get('LOCAL_RANK')} on "
          f"{socket.gethostname()}, node {os.environ.get('CROSS_RANK', '0')}) {how}", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
