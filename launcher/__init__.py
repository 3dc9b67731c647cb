"""Start a training run on this machine, on hosts from a hostfile or list, or inside a Slurm allocation, without SSH.

`__main__` parses the command line, `hosts` finds the nodes, `process` runs a child and forwards preemption
signals to the ranks, `rank` wraps each rank so a failure is reported with the rank that failed.
"""
