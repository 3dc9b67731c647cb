"""slurm/train.sbatch on a live two-node Slurm cluster: a real 2-node DeepSpeed job (one rank per node, srun, no
SSH) runs to completion, and a job signalled mid-run saves, requeues itself, resumes and ends exactly where an
uninterrupted job ends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, read_metrics

STEPS = 30


def recipe(path, tiny_data, out) -> str:
    """The tiny model of tests/conftest.py as a run config file, the way a user would submit one."""
    path.write_text(f"""run: {{output_dir: {out}}}
model: {{model_type: gpt2, hf_config: {{n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64}}}}
data: {{path: {tiny_data['shards']}, seq_len: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 4}}
train: {{max_steps: {STEPS}, micro_batch_size: 4, log_every: 1, eval_every: 0, save_every: 0}}
""")
    return str(path)


def submit(config: str, log_dir, name: str) -> str:
    env = {**os.environ, "CONFIG": config, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/train-%j.out", "slurm/train.sbatch",
                          f"run.name={name}"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_done(job_id: str, log, timeout: float = 240) -> dict:
    state = wait_until(lambda: (lambda j: j if j["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING",
                                                                       "COMPLETING", "REQUEUED") else None)(
        job(job_id)), timeout, f"job {job_id} to end")
    assert state["JobState"] == "COMPLETED", (state, log.read_text()[-4000:])
    return state


@pytest.fixture(scope="module")
def completed_job(slurm_cluster, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_runs")
    job_id = submit(recipe(out / "tiny.yaml", tiny_data, out), out, "whole")
    log = out / f"train-{job_id}.out"
    wait_done(job_id, log)
    return out / "whole", log.read_text()


def test_train_sbatch_runs_a_two_node_job(completed_job):
    run_dir, log = completed_job
    assert re.search(r"srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --export=ALL \S+ -m launcher .* "
                     r"--nodes n1,n2 --master-port \d+", log), log[-3000:]
    for rank in (0, 1):  # each node's launcher ran DeepSpeed without SSH, master = the first node
        assert re.search(rf"--no_ssh --node_rank {rank} --master_addr n1 --master_port \d+", log), log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["preempted"] is False
    assert sorted(read_metrics(run_dir)) == list(range(1, STEPS + 1))


def test_signalled_job_saves_requeues_and_resumes_to_the_same_loss(completed_job, tiny_data, tmp_path):
    whole_dir, _ = completed_job
    job_id = submit(recipe(tmp_path / "tiny.yaml", tiny_data, tmp_path), tmp_path, "preempted")
    log = tmp_path / f"train-{job_id}.out"
    run_dir = tmp_path / "preempted"
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and max(read_metrics(run_dir), default=0) >= 2,
               120, "step 2")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)

    # The batch script requeues the job; Slurm holds a requeued job ~2 min (BeginTime): release it now.
    wait_until(lambda: job(job_id)["Restarts"] == "1" and job(job_id)["JobState"] == "PENDING", 120,
               f"job {job_id} to be requeued")
    saved = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    assert 2 <= saved < STEPS
    # Release only once both nodes have cleaned up the first start: a job started while its old instance is
    # still being killed there fails ("Job credential revoked"); the BeginTime hold is what avoids that normally.
    wait_until(lambda: subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True,
                                      text=True).stdout.split() == ["n1", "n2"], 60, "nodes idle after requeue")
    # slurmd compares a credential's time with the job's revocation time at 1-second resolution: a restart within
    # the second of the requeue is refused as "Job credential revoked" (seen here under load).
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    wait_done(job_id, log)

    text = log.read_text()
    assert "batch script: preemption signal, forwarding to the launcher" in text
    assert re.search(rf"preempted \((SIGUSR1|signal on another rank)\) at step {saved}: checkpoint \S+ on disk",
                     text), text[-4000:]
    assert f"checkpoint saved after preemption, requeueing job {job_id}" in text
    assert f"job {job_id} start 1 on" in text and f"resumed from {run_dir / f'checkpoints/step_{saved}'}" in text
    whole, got = read_metrics(whole_dir), read_metrics(run_dir)
    assert [got[s]["train/loss"] for s in range(1, STEPS + 1)] == [whole[s]["train/loss"] for s in
                                                                  range(1, STEPS + 1)]
    assert json.loads((run_dir / "summary.json").read_text())["final_train_loss"] == \
        json.loads((whole_dir / "summary.json").read_text())["final_train_loss"]
