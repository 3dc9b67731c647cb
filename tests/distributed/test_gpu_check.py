"""bench/gpu_check.sh, the GPU check (a 1B Llama, ours vs the HF Trainer, fp16), run end to end in its --smoke mode on
a CPU: its Llama run (llama-tiny standing in for llama-1b: same model code path, ZeRO-2, activation checkpointing)
and its 14M-model comparison with the HF Trainer both train and leave their figures in $OUT; its fp16 run needs CUDA
and says it was skipped. Nothing about speed is asserted: the figures are the bench's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT


def test_gpu_check_smoke_runs_both_checks_and_writes_their_figures(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPU_CHECK_WORK": str(work)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith(f"gpu_check: done; figures in {out}")
    assert "| deepspeed 0.19.8" in (out / "gpu_check_env.txt").read_text()

    llama = json.loads((out / "gpu_check_llama.json").read_text())
    assert (llama["args"]["model"], llama["args"]["activation_checkpointing"], llama["args"]["ranks"]) == (
        "llama-tiny", True, 1)
    [row] = llama["results"]
    assert row["stage"] == 2 and row["ours"] > 0 and "hf" not in row
    assert sorted(map(int, row["ours_losses"])) == [1, 2, 3, 4]
    run_config = yaml.safe_load((work / "llama" / "zero2" / "ours" / "config.yaml").read_text())
    assert run_config["model"]["model_type"] == "llama"
    assert run_config["model"]["activation_checkpointing"] is True
    assert run_config["train"]["deepspeed_config"] == "ds_configs/zero2.json"

    gpt2 = json.loads((out / "gpu_check_gpt2.json").read_text())
    assert (gpt2["args"]["model"], gpt2["args"]["only"]) == ("gpt2-14m", None)
    [row] = gpt2["results"]
    assert row["ours"] > 0 and row["hf"] > 0 and row["ours_mfu"] > 0 and row["hf_mfu"] > 0
    assert row["loss_gap"][2] == 4  # ours and HF compared on all 4 steps
    assert "ours/HF" in (out / "gpu_check_gpt2.txt").read_text()
    # auto, resolved once by the bench for both trainers: bf16 or fp32 on a CPU, bf16 on a GPU with bf16.
    assert gpt2["precision"]["requested"] == "auto" and gpt2["precision"]["precision"] in ("bf16", "fp32")
    assert (out / "gpu_check_gpt2_fp16.txt").read_text() == (
        "gpu_check: gpt2_fp16 skipped: no CUDA (DeepSpeed's CPU accelerator has no fp16)\n")
