"""slurm/prep.sbatch on the live cluster: a 3-task array tokenizes its parts, `data_prep merge` assembles them, and
the result is byte-identical to one `tokenize` run on the same corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT, data_prep


def test_prep_array_job_then_merge_equals_a_single_run(slurm_cluster, tiny_data, tmp_path):
    out = tmp_path / "shards"
    env = {**os.environ, "INPUT": str(tiny_data["corpus"]), "TOKENIZER": str(tiny_data["tokenizer"]),
           "OUTPUT": str(out), "PYTHON": sys.executable}
    job_id = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--cpus-per-task=1",
                             f"--output={tmp_path}/prep-%A_%a.out", "slurm/prep.sbatch", "--val-fraction", "0.1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 240
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"array job {job_id} still queued or running after 240 s"
        time.sleep(0.2)
    for task in range(3):
        log = (tmp_path / f"prep-{job_id}_{task}.out").read_text()
        assert f"task {task} of 3:" in log and "python -m data_prep merge" in log, log[-2000:]
    assert not (out / "manifest.json").exists()  # nothing is visible before the merge
    data_prep("merge", str(out))

    single = tmp_path / "single"
    data_prep("tokenize", "--input", str(tiny_data["corpus"]), "--tokenizer", str(tiny_data["tokenizer"]),
              "--output", str(single), "--val-fraction", "0.1")
    merged = json.loads((out / "manifest.json").read_text())
    reference = json.loads((single / "manifest.json").read_text())
    assert merged["splits"] == reference["splits"] and merged["counts"] == reference["counts"]
    for entry in merged["splits"]["train"]["shards"] + merged["splits"]["val"]["shards"]:
        assert (out / entry["file"]).read_bytes() == (single / entry["file"]).read_bytes()
