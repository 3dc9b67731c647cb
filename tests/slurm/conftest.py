"""A throwaway live Slurm cluster on this machine: munge + slurmctld + two slurmd "nodes" n1, n2 (Debian's
packages, installed if missing), configured under a temp dir, torn down by PID.

Needs root (daemons, apt-get, /etc/hosts). Elsewhere the Slurm tests skip with the reason; in CI (CI=true) a
machine that cannot run them is an error, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

NODES = ("n1", "n2")
HOSTS_MARK = "# reparam-slurm-tests"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm tests must run in CI: {reason}")
    pytest.skip(reason)


def _install_if_missing() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        _unavailable("Slurm is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


def _munge_works() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pids: list[int]) -> None:
    try:
        _wait(lambda: not any(map(_alive, pids)), 10, "daemons did not stop")
    except TimeoutError:
        for pid in filter(_alive, pids):
            os.kill(pid, 9)


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 2
    nodes = "\n".join(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                      f"CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN"
                      for name, port in zip(NODES, node_ports))
    # proctrack/linuxproc + task/none: no cgroups needed in a container; MinJobAge keeps finished jobs visible
    # to `scontrol show job` (there is no accounting database).
    return f"""ClusterName=reparamtest
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=5
MinJobAge=600
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _set_hosts(lines_without_mark: str) -> None:
    # Rewrite in place (not rename): container runtimes bind-mount /etc/hosts.
    Path("/etc/hosts").write_text(lines_without_mark)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF is set in os.environ for the session, so sbatch/scontrol here and in jobs find the cluster."""
    if os.geteuid() != 0:
        _unavailable("the Slurm tests start slurmctld/slurmd/munged and edit /etc/hosts: they need root")
    _install_if_missing()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "log", "spool/n1", "spool/n2"):
        (root / sub).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, free_port(), [free_port() for _ in NODES]))
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)

    munged_pid = None
    if not _munge_works():
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:
            subprocess.run(["mungekey", "-c"], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        _wait(_munge_works, 10, "munged did not start")
        munged_pid = int(Path("/run/munge/munged.pid").read_text())

    hosts = Path("/etc/hosts").read_text()
    _set_hosts(hosts + f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")  # MASTER_ADDR=n1 must resolve
    pidfiles = [root / "slurmctld.pid", *(root / f"slurmd-{n}.pid" for n in NODES)]
    try:
        subprocess.run(["slurmctld", "-c"], check=True)  # daemonizes; -c: empty job state
        for name in NODES:
            subprocess.run(["slurmd", "-N", name], check=True)

        def all_idle():
            out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True)
            return set(out.stdout.split()) == set(NODES)

        _wait(all_idle, 30, "Slurm nodes did not become idle")
        yield {"root": root, "conf": conf}
    finally:
        # Jobs first: slurmstepd outlives a slurmd shut down under it.
        subprocess.run("squeue -h -o %i | xargs -r scancel", shell=True, capture_output=True)
        try:
            _wait(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), 60,
                  "jobs did not end")
        except TimeoutError:
            pass  # shut down anyway; the daemons below are still stopped by PID
        pids = [int(p.read_text()) for p in pidfiles if p.exists()]
        subprocess.run(["scontrol", "shutdown"], capture_output=True)  # stops slurmctld and every slurmd
        _stop(pids)
        if munged_pid:
            os.kill(munged_pid, 15)
            _stop([munged_pid])
        _set_hosts("".join(line for line in Path("/etc/hosts").read_text().splitlines(keepends=True)
                           if not line.rstrip().endswith(HOSTS_MARK)))
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
