"""Entry point: `deepspeed train/main.py --config configs/X.yaml [section.key=value ...]`.

Thin on purpose: parse, build a Trainer, fit, always clean up. Errors a user can fix are printed as one line
(`error: ...`) with exit code 2 (`train.exit_codes.USAGE`) instead of a traceback per rank; a preempted run exits 75
(`PREEMPTED`) once its checkpoint is saved.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts train/ first on sys.path, where config.py, data.py, ... would shadow
    # top-level modules of the same name. Put the project root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train import config as config_lib  # noqa: E402
from train import exit_codes, run_dir  # noqa: E402
from data_prep.errors import DataError  # noqa: E402
from train.errors import RunError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a model with DeepSpeed from a run config.")
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its documentation")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    if not args.help_config and not args.config:
        parser.error("--config is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_lib.describe())
        return exit_codes.OK
    rank = os.environ.get("RANK", "0")
    trainer = None
    try:
        cfg = config_lib.load(args.config, args.overrides)
        from train import ds_config

        ds_config.load_preset(cfg.train.deepspeed_config)  # a bad preset fails here, not after the ranks started
        run_dir.prepare(cfg.run_dir)
        from train.trainer import Trainer  # heavy imports (deepspeed, transformers) only once the config is valid

        trainer = Trainer(cfg)
        summary = trainer.fit()
        # Rank 0 finishes later (results, TensorBoard, the summary table); a rank that tears down its process group
        # meanwhile can abort in gloo at exit ("terminate called without an active exception").
        import torch.distributed as dist

        dist.barrier()
        return exit_codes.PREEMPTED if summary["preempted"] else exit_codes.OK
    except (RunError, DataError) as exc:
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return exit_codes.USAGE
    finally:
        if trainer is not None:
            trainer.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # A rank of a multi-rank run has saved, closed and flushed everything by now. It skips the interpreter's
        # teardown: there the collective libraries' threads, still referenced by DeepSpeed's objects, are destroyed
        # in no set order and now and then abort the rank ("terminate called without an active exception", exit -6)
        # after a run that completed, which the launcher would report as a failure. A single process exits
        # normally, so that profilers and coverage still write their reports.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
