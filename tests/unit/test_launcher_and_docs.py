"""The launcher's commands, environment and input errors, and the README commands CI depends on."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.__main__ import rank_environment

ROOT = Path(__file__).resolve().parents[2]


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


def test_explicit_thread_setting_wins_and_pythonpath_is_kept():
    assert rank_environment(2, {"OMP_NUM_THREADS": "3", "PYTHONPATH": "/x"}) == {"PYTHONPATH": f"{ROOT}:/x"}
    assert rank_environment(os.cpu_count() * 2, {})["OMP_NUM_THREADS"] == "1"


def test_the_batch_scripts_requeue_on_the_trainers_preemption_exit_code():
    """slurm/requeue.sh is shell and repeats the code; it must be the one train/main.py and the launcher exit with."""
    from train import exit_codes

    [value] = re.findall(r"^PREEMPTED_EXIT_CODE=(\d+)\b", (ROOT / "slurm/requeue.sh").read_text(), re.M)
    assert int(value) == exit_codes.PREEMPTED


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


def readme_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_block_after("## Tests (one command)")
    assert command in (ROOT / ".ci/run").read_text().splitlines()
    assert command.endswith("-m pytest tests")


def test_readme_quickstart_uses_shipped_files():
    command = readme_block_after("## Quick start")
    for path in re.findall(r"--config (\S+)", command):
        assert (ROOT / path).is_file(), path



def test_the_readme_test_command_collects_every_test_file():
    """pytest skips directories named like build outputs (`dist`, `build`, ...) unless told otherwise: every test
    file under tests/ must be collected by the plain `pytest tests` that CI runs."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert collected == on_disk
