"""The layout of a run directory, `<run.output_dir>/<run.name>/`: the one place that names its files.

    config.yaml          the resolved run config (train.export and train.predict rebuild the model from it)
    data_manifest.json   the manifest of the shards it trained on (tokenizer, framing, labels)
    checkpoints/         step_<N>/ + latest + best (train.checkpoint)
    tb/                  TensorBoard event files
    metrics.jsonl        every logged scalar, one JSON object per line
    summary.json         the end-of-session summary (throughput, MFU, memory, final losses)
    results.json         validation and test metrics of a completed run (before and after training)
    report.png           the curves `python -m train.report` plots
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from train.errors import ConfigError

CONFIG = "config.yaml"
DATA_MANIFEST = "data_manifest.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RESULTS = "results.json"
REPORT = "report.png"


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a training run's directory (as opposed to an exported model)."""
    return (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def prepare(run_dir: Path) -> None:
    """Create the run directory if needed and make sure the run can write there (and into what an earlier run left:
    checkpoints/, tb/, metrics.jsonl), before any process group starts or any model is built."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir} ({exc.strerror}); choose another "
                          "run.output_dir or run.name") from None
    for path in (run_dir, run_dir / CHECKPOINTS, run_dir / TENSORBOARD, run_dir / METRICS):
        try:  # a real write (os.access is wrong on read-only mounts and for root)
            if path.is_dir():
                fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
                os.close(fd)
                os.unlink(probe)
            elif path.is_file():
                open(path, "ab").close()
        except OSError as exc:
            raise ConfigError(f"{path} is not writable ({exc.strerror}): the run directory {run_dir} must be "
                              "writable by this user (fix its permissions, or choose another run.output_dir or "
                              "run.name)") from None
