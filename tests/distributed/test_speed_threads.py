"""The thread count a rank trains with, for real: `python -m launcher` without OMP_NUM_THREADS gives each rank
cores available / ranks per node (docs/launcher.md), which the rank's torch uses (it reports it in the summary's
peak-FLOPs source)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, TINY_MODEL


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
