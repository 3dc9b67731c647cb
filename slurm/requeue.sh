# Requeue-on-preemption, sourced by slurm/*.sbatch:  run_requeueable COMMAND [ARGS...]
#
# Bash runs a trap only between commands, so COMMAND runs in the background while the script `wait`s: USR1 (from
# `#SBATCH --signal=B:USR1@lead` or `scancel --batch --signal=USR1`) and TERM then reach the trap at once, which
# forwards them as USR1 to COMMAND (`python -m launcher`, which relays them to every rank through srun). The ranks
# save a checkpoint and exit 75; the job then requeues itself and the next start resumes from that checkpoint
# (run.resume=auto). Any other exit code ends the job with that code.

PREEMPTED_EXIT_CODE=75  # train.exit_codes.PREEMPTED (a unit test checks that they agree)

run_requeueable() {
    "$@" &
    local pid=$!
    trap 'echo "$(date +%T) batch script: preemption signal, forwarding to the launcher"; kill -USR1 '"$pid" USR1 TERM
    # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until the child is gone.
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
    wait "$pid"  # bash keeps the status of a reaped child: this returns COMMAND's real exit code
    local code=$?
    trap - USR1 TERM
    if [ "$code" -eq "$PREEMPTED_EXIT_CODE" ]; then
        echo "$(date +%T) batch script: checkpoint saved after preemption, requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$code"
}
