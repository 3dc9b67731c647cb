"""`python -m launcher --config X.yaml [--nproc N] [--nodes HOSTS|slurm | --hostfile FILE] [--dry-run] [overrides]`
(`python -m launcher plan --config X.yaml ...` predicts memory and time first: launcher/plan.py)

Starts train/main.py through DeepSpeed's launcher, without SSH:
- no --nodes/--hostfile: N ranks on this machine;
- --nodes h1,h2 or --hostfile FILE: run the same command on every host, each with its --node-rank (index in the
  list; defaults to $SLURM_NODEID); the first host is the master, so --master-port must agree on all hosts;
- --nodes slurm: inside an allocation, one DeepSpeed launcher per node started by srun, master = first node,
  port = a free one on it.
Each rank gets the launcher's environment plus PYTHONPATH (project root) and an equal share of the node's cores
(OMP_NUM_THREADS, unless set). SIGUSR1/SIGTERM ask every rank to checkpoint and exit 75. Prints the exact command
(and its environment additions) before running it; --dry-run prints only.

A local run's rendezvous listens on 127.0.0.1 only (launcher/rendezvous.py: the launcher hosts the store on
loopback; a --dry-run command, run by hand, lets rank 0 host it on MASTER_PORT as usual). A generated hostfile is
written into a fresh private directory (mkdtemp), never to a predictable path in a shared temp directory.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from launcher import hosts as hosts_lib
from launcher import process
from launcher import rendezvous
from launcher.hosts import LaunchError
from train.exit_codes import OK, PREEMPTED

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "train" / "main.py"
RANK_WRAPPER = ROOT / "launcher" / "rank.py"
DEFAULT_MULTI_NODE_PORT = 29500


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deepspeed() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


def training_args(args) -> list[str]:
    # --no_local_rank: the wrapper, not DeepSpeed, is the script; train/main.py reads LOCAL_RANK from the env.
    return ["--no_local_rank", str(RANK_WRAPPER), str(ENTRY), "--config", args.config, *args.overrides]


def local_command(args, port: int) -> list[str]:
    return [deepspeed(), "--num_gpus", str(args.nproc), "--master_addr", rendezvous.LOOPBACK, "--master_port",
            str(port), *training_args(args)]


def node_command(args, hosts: hosts_lib.Hosts, hostfile: str, node_rank: int) -> list[str]:
    return [deepspeed(), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", hosts[0][0], "--master_port", str(args.master_port), *training_args(args)]


def slurm_command(args, hosts: hosts_lib.Hosts, port: int) -> list[str]:
    # One task per node runs this launcher again with the host list; it takes its node rank from $SLURM_NODEID.
    # --export=ALL: every rank sees the batch script's environment even if the site sets SBATCH_EXPORT=NONE.
    inner = [sys.executable, "-m", "launcher", "--config", args.config, "--nproc", str(args.nproc),
             "--nodes", ",".join(host for host, _ in hosts), "--master-port", str(port), *args.overrides]
    return ["srun", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1", "--export=ALL",
            *inner]


def hostfile_for(hosts: hosts_lib.Hosts) -> str:
    """A hostfile for DeepSpeed, written on this node so nodes need no shared file: in a new directory that only
    this user can enter (mkdtemp: a fresh name, mode 0700), so no planted file or link is ever written through."""
    directory = tempfile.mkdtemp(prefix="reparam-hostfile-")
    path = Path(directory) / "hostfile"
    hosts_lib.write_hostfile(hosts, path)
    return str(path)


def rank_environment(nproc: int, environ: dict) -> dict:
    """Variables added to every rank's environment (NCCL_*, GLOO_*, ... pass through unchanged)."""
    paths = [path for path in environ.get("PYTHONPATH", "").split(os.pathsep) if path and path != str(ROOT)]
    extra = {"PYTHONPATH": os.pathsep.join([str(ROOT), *paths])}
    if "OMP_NUM_THREADS" not in environ:
        # Ranks that each start one thread per core oversubscribe the node; affinity respects Slurm's cgroup.
        extra["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return extra


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per node (GPUs, or CPU processes)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nodes", help="'slurm', or comma-separated hosts (the first is the master)")
    where.add_argument("--hostfile", help="MPI-style hostfile: 'HOST slots=N' per line, the first is the master")
    parser.add_argument("--node-rank", type=int, help="this host's index in --nodes/--hostfile "
                        "(default: $SLURM_NODEID)")
    parser.add_argument("--master-port", type=int, default=DEFAULT_MULTI_NODE_PORT,
                        help=f"port on the first host, the same on every host (default {DEFAULT_MULTI_NODE_PORT})")
    parser.add_argument("--dry-run", action="store_true", help="print the command without running it")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides passed to train/main.py")
    return parser, parser.parse_args(argv)


def plan(args, environ: dict, port: int | None = None) -> tuple[list[str], dict, str]:
    """(command, environment additions, mode) for this invocation; LaunchError on bad input. `port`: the local
    run's rendezvous port (default: a free one on loopback)."""
    if args.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nodes == "slurm":
        hosts = hosts_lib.from_slurm(environ, args.nproc)
        return slurm_command(args, hosts, free_port()), rank_environment(args.nproc, environ), "slurm"
    if args.nodes is None and args.hostfile is None:
        extra = {**rank_environment(args.nproc, environ), **rendezvous.loopback_environment(environ)}
        return local_command(args, port or free_port(rendezvous.LOOPBACK)), extra, "local"
    hosts = hosts_lib.from_hostfile(args.hostfile) if args.hostfile else hosts_lib.from_list(args.nodes, args.nproc)
    node_rank = args.node_rank if args.node_rank is not None else environ.get("SLURM_NODEID")
    if node_rank is None:
        raise LaunchError("--node-rank is required with --nodes/--hostfile: this host's index in the host list")
    node_rank = int(node_rank)
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"--node-rank {node_rank} is out of range: {len(hosts)} host(s) listed")
    hostfile = args.hostfile or hostfile_for(hosts)
    extra = rank_environment(hosts[node_rank][1], environ)
    return node_command(args, hosts, hostfile, node_rank), extra, "node"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from launcher import plan as plan_command

        return plan_command.main(argv[1:])
    parser, args = parse_args(argv)
    store = None
    if args.nodes is None and args.hostfile is None and not args.dry_run and args.nproc >= 1:
        store = rendezvous.LoopbackStore()  # a local run: rank 0 joins it instead of listening on every interface
    try:
        command, extra, mode = plan(args, os.environ, port=store.port if store else None)
    except LaunchError as exc:
        parser.error(str(exc))
    if store:
        extra.update(store.environment())
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in extra.items()), *map(shlex.quote, command)]), flush=True)
    if args.dry_run:
        return OK
    if mode == "slurm":
        def forward(child):
            child.send_signal(signal.SIGUSR1)
            return "relayed to every node through srun"
    else:
        def forward(child):
            return f"asked {process.signal_ranks(child, str(ENTRY))} local rank(s) to checkpoint and exit"
    with tempfile.TemporaryDirectory(prefix="reparam-ranks-") as status_dir:
        code = process.run(command, {**os.environ, **extra, "REPARAM_RANK_STATUS_DIR": status_dir}, forward)
        if code not in (OK, PREEMPTED) and any(Path(status_dir).glob("preempted-rank*")):
            print(f"launcher: DeepSpeed's launcher exited {code} after the ranks saved a preemption checkpoint "
                  f"(it was signalled too); exiting {PREEMPTED}", flush=True)
            code = PREEMPTED
    if mode == "node" and not args.hostfile:  # the hostfile this launcher wrote; DeepSpeed read it at start
        shutil.rmtree(Path(command[command.index("--hostfile") + 1]).parent, ignore_errors=True)
    if code not in (OK, PREEMPTED):
        print(f"launcher: {mode} run failed with exit code {code} (the failed rank is named above)",
              file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
