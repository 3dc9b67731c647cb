"""`python -m launcher` for real: two "nodes" on one box without SSH, preemption through the launcher, a killed rank
stopping the whole run with its name in the log, and each rank training with the share of the cores the launcher
documents (docs/launcher.md: cores available / ranks per node, reported in the summary's peak-FLOPs source)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time


from tests.conftest import ROOT, TINY_MODEL, free_port, read_metrics

STEPS = 6
RUN = [*TINY_MODEL, f"train.max_steps={STEPS}", "train.log_every=1", "eval.every=0", "checkpoint.every=0",
       "train.collective_timeout_s=30"]
# Two "nodes" on a 2-core box: one thread per rank, or 4 threads fight over 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "--config", str(ROOT / "configs/quickstart.yaml"), *args]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(launcher(*args), cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(read_metrics(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, finish(proc)
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def losses(run_dir) -> list[float]:
    metrics = read_metrics(run_dir)
    return [metrics[s]["train/loss"] for s in range(1, STEPS + 1)]


def test_two_nodes_without_ssh_match_the_single_node_run(tiny_data, tmp_path):
    data = [f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}"]
    code, out, err = finish(start("--nproc", "2", *RUN, *data, "run.name=single"))
    assert code == 0, err[-3000:]
    assert "--num_gpus 2 --master_addr 127.0.0.1 --master_port" in out.splitlines()[0]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes on loopback\n127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = str(free_port())
    nodes = [start("--hostfile", str(hostfile), "--node-rank", str(rank), "--master-port", port, *RUN, *data,
                   "run.name=two_nodes", env={"GLOO_SOCKET_IFNAME": "lo"}) for rank in (0, 1)]
    results = [finish(node) for node in nodes]
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        assert (f"--hostfile {hostfile} --no_ssh --node_rank {rank} --master_addr 127.0.0.1 --master_port {port}"
                in out.splitlines()[0])
    assert losses(tmp_path / "two_nodes") == losses(tmp_path / "single")  # same world, bit for bit
    summary = json.loads((tmp_path / "two_nodes/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS


def test_usr1_to_the_launcher_checkpoints_and_exits_75(tiny_data, tmp_path):
    proc = start("--nproc", "2", *TINY_MODEL, "train.max_steps=10000", "train.log_every=1", "eval.every=0",
                 f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}", "run.name=pre")
    wait_for_step(tmp_path / "pre", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    code, out, err = finish(proc, timeout=120)
    assert code == 75, err[-3000:]
    assert "launcher: SIGUSR1 at" in out and "asked 2 local rank(s) to checkpoint and exit" in out
    step = int((tmp_path / "pre/checkpoints/latest").read_text().removeprefix("step_"))
    assert 2 <= step < 10000
    assert f"preempted (SIGUSR1) at step {step}: checkpoint" in out and "s after the signal" in out
    assert json.loads((tmp_path / "pre/summary.json").read_text())["preempted"] is True


def test_killed_rank_stops_the_launcher_within_60s_and_is_named(tiny_data, tmp_path):
    proc = start("--nproc", "2", *TINY_MODEL, "train.max_steps=10000", "train.log_every=1", "eval.every=0",
                 f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}", "run.name=killed",
                 env={"REPARAM_FAULT_AT_STEP": "3", "REPARAM_FAULT_RANK": "1"})
    wait_for_step(tmp_path / "killed", 3, proc)
    start_wait = time.monotonic()
    code, out, err = finish(proc, timeout=60)
    assert time.monotonic() - start_wait < 60
    assert code == 128 + signal.SIGKILL, (code, err[-3000:])
    assert "launcher: rank 1 (local rank 1 on" in err and "node 0) died from SIGKILL" in err, err[-3000:]
    assert "launcher: local run failed with exit code 137 (the failed rank is named above)" in err


def test_sigterm_to_every_process_still_exits_75(tiny_data, tmp_path):
    """What Slurm does on preemption or at the time limit: SIGTERM to every process of the job, DeepSpeed's own
    launcher included (which then exits 1 whatever its ranks did)."""
    proc = subprocess.Popen(launcher("--nproc", "2", *TINY_MODEL, "train.max_steps=10000", "train.log_every=1",
                                     "eval.every=0", f"data.path={tiny_data['shards']}",
                                     f"run.output_dir={tmp_path}", "run.name=term"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_step(tmp_path / "term", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    assert code == 75, (code, err[-3000:])
    assert ("launcher: DeepSpeed's launcher exited 1 after the ranks saved a preemption checkpoint (it was "
            "signalled too); exiting 75") in out
    step = int((tmp_path / "term/checkpoints/latest").read_text().removeprefix("step_"))
    # SIGTERM reaches the trainers both directly and as the SIGUSR1 our launcher forwards; either may be first.
    assert re.search(rf"preempted \((SIGTERM|SIGUSR1)\) at step {step}: checkpoint", out), out[-3000:]
    assert json.loads((tmp_path / "term/summary.json").read_text())["preempted"] is True


def test_a_rank_killed_on_one_node_stops_both_nodes_within_60s(tiny_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = str(free_port())
    nodes = [start("--hostfile", str(hostfile), "--node-rank", str(rank), "--master-port", port, *TINY_MODEL,
                   "train.max_steps=10000", "train.log_every=1", "eval.every=0", "train.collective_timeout_s=30",
                   f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}", "run.name=two_nodes",
                   env={"GLOO_SOCKET_IFNAME": "lo", "REPARAM_FAULT_AT_STEP": "3", "REPARAM_FAULT_RANK": "1"})
             for rank in (0, 1)]
    wait_for_step(tmp_path / "two_nodes", 3, nodes[0])
    start_wait = time.monotonic()
    results = [finish(node, timeout=60) for node in nodes]
    assert time.monotonic() - start_wait < 60
    (code0, _, err0), (code1, _, err1) = results
    assert code1 == 128 + signal.SIGKILL and "launcher: rank 1 (local rank 0 on" in err1, (code1, err1[-2000:])
    assert "node 1) died from SIGKILL" in err1
    # The surviving node's rank fails at its next collective (the peer's connection is gone) and is named.
    assert code0 not in (0, 75) and "launcher: rank 0 (local rank 0 on" in err0, (code0, err0[-2000:])


def test_launcher_gives_a_rank_the_cores_it_documents(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "launcher", "--config", str(ROOT / "configs/quickstart.yaml"), "--nproc", "1",
           *TINY_MODEL, "train.max_steps=2", "eval.every=0", "checkpoint.every=0", 'data.val_split=""',
           f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}", "run.name=threads"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f"OMP_NUM_THREADS={cores} " in proc.stdout.splitlines()[0]
    summary = json.loads((tmp_path / "threads" / "summary.json").read_text())
    assert summary["peak_flops_source"].endswith(f", {cores} threads")
