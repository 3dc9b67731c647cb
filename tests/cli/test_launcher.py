"""`python -m launcher --dry-run` as its own process: the DeepSpeed command it would run (thread share, loopback
rendezvous for a local run, no SSH, the master and node rank from a host list, a hostfile or Slurm), one clear error
for bad input, and a hostfile written in a private directory, never through a link planted in a shared temp dir;
and the per-rank wrapper launcher/rank.py run as a script from anywhere without loading torch. In this process:
tests/unit/test_launcher.py; with real ranks: tests/distributed/test_launcher.py."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--dry-run",
                           *args], cwd=ROOT, env=env or os.environ, capture_output=True, text=True)


def test_dry_run_prints_the_deepspeed_command_with_thread_share():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH", "GLOO_SOCKET_IFNAME")}
    out = dry_run("--nproc", "2", "train.max_steps=5", env=env)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    pattern = (rf"PYTHONPATH={ROOT} OMP_NUM_THREADS={threads} GLOO_SOCKET_IFNAME=lo \S+/deepspeed --num_gpus 2 "
               rf"--master_addr 127\.0\.0\.1 --master_port \d+ "
               rf"--no_local_rank {ROOT}/launcher/rank.py {ROOT}/train/main.py "
               rf"--config configs/quickstart.yaml train.max_steps=5")
    assert out.returncode == 0 and re.fullmatch(pattern, out.stdout.strip()), out


def test_hostfile_node_command_has_no_ssh_and_the_first_host_as_master(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=4  # master\ngpu-b slots=4\n")
    out = dry_run("--hostfile", str(hostfile), "--node-rank", "1", "--master-port", "1234")
    assert (f"--hostfile {hostfile} --no_ssh --node_rank 1 --master_addr gpu-a --master_port 1234 "
            in out.stdout), out


def test_node_rank_defaults_to_slurm_nodeid():
    out = dry_run("--nodes", "n1,n2,n3", env={**os.environ, "SLURM_NODEID": "2"})
    assert "--no_ssh --node_rank 2 --master_addr n1 --master_port 29500" in out.stdout, out


@pytest.mark.parametrize("args, error", [
    (["--nodes", "a,b"], "--node-rank is required with --nodes/--hostfile: this host's index in the host list"),
    (["--nodes", "a,b", "--node-rank", "2"], "--node-rank 2 is out of range: 2 host(s) listed"),
    (["--nodes", "a,a", "--node-rank", "0"], "--nodes: host listed twice: a"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--hostfile", "/nonexistent/hosts", "--node-rank", "0"],
     "--hostfile: cannot read /nonexistent/hosts: No such file or directory"),
    (["--nodes", "slurm"], "--nodes slurm: SLURM_JOB_NODELIST is not set; run inside an allocation (sbatch/salloc)"),
])
def test_bad_input_is_one_clear_error(args, error):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = dry_run(*args, env=env)
    assert out.returncode == 2 and out.stderr.strip().endswith(f"error: {error}"), out.stderr


def test_bad_hostfile_line_is_named(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=two\n")
    out = dry_run("--hostfile", str(hostfile), "--node-rank", "0")
    assert out.stderr.strip().endswith(f"error: --hostfile {hostfile} line 2: expected 'HOST slots=N', "
                                       "got 'b slots=two'"), out.stderr


def test_the_rank_wrapper_runs_as_a_script_from_anywhere_without_loading_torch(tmp_path):
    """DeepSpeed's launcher runs `python launcher/rank.py train/main.py ...`; the wrapper imports the exit-code table
    from the project root whatever the working directory and PYTHONPATH, and nothing that loads torch."""
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], '-c', 'pass']; code = 0\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'train', 'launcher')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe, str(ROOT / "launcher/rank.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0 ['train', 'train.exit_codes']", out


def test_the_hostfile_is_never_written_through_a_planted_link(tmp_path):
    shared_tmp = tmp_path / "shared_tmp"
    shared_tmp.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    hosts = [("n1", 1), ("n2", 1)]
    text = "".join(f"{host}:{slots}," for host, slots in hosts)
    old_name = f"reparam-hostfile-{hashlib.sha1(text.encode()).hexdigest()[:12]}"  # a predictable name
    (shared_tmp / old_name).symlink_to(victim)
    (shared_tmp / "reparam-hostfile").symlink_to(victim)
    env = {**os.environ, "TMPDIR": str(shared_tmp)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--dry-run",
                           "--nodes", "n1,n2", "--node-rank", "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    hostfile = Path(proc.stdout.split("--hostfile ", 1)[1].split()[0])
    assert victim.read_text() == "precious\n"
    assert hostfile.parent.parent == shared_tmp and hostfile.parent.name.startswith("reparam-hostfile-")
    assert not hostfile.is_symlink() and hostfile.read_text() == "n1 slots=1\nn2 slots=1\n"
    assert stat.S_IMODE(hostfile.parent.stat().st_mode) == 0o700 and stat.S_IMODE(hostfile.stat().st_mode) == 0o600


def test_a_local_run_rendezvous_is_on_loopback():
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--dry-run",
                           "--nproc", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert " GLOO_SOCKET_IFNAME=lo " in proc.stdout and " --master_addr 127.0.0.1 --master_port " in proc.stdout
