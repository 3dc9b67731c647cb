"""Exit codes of a training process and of the launcher, in one table.

Imports nothing, so the launcher's per-rank wrapper can use it without loading torch. `slurm/requeue.sh` is shell
and repeats PREEMPTED (a test checks that it agrees).
"""

OK = 0
FAILED = 1  # a crash: a traceback was printed
USAGE = 2  # a problem the user can fix (config, data, run directory): one `error: ...` line was printed
PREEMPTED = 75  # EX_TEMPFAIL, "try again later": a preemption checkpoint was saved; batch scripts requeue on it
