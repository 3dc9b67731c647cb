"""train.precision on real 2-rank runs: a resumed run keeps the precision its checkpoint was trained in, whatever
`auto` would pick now; a checkpoint this hardware cannot run and fp16 on CPU are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import ROOT, reference_overrides, run_training

RECIPE = ROOT / "configs/quickstart.yaml"


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return next(line for line in proc.stderr.splitlines() if "error: " in line)


@pytest.fixture(scope="module")
def fp32_run(tiny_data, tmp_path_factory):
    """4 steps in fp32 (which `auto` never picks on a CPU with bf16 flags), checkpointed at step 4; each test resumes
    a copy of it."""
    root = tmp_path_factory.mktemp("fp32")
    run_training(RECIPE, [*reference_overrides(tiny_data, root, "run", stage=1, steps=4), "train.precision=fp32"])
    return root / "run"


def copy_of(run_dir, tmp_path, tiny_data):
    shutil.copytree(run_dir, tmp_path / "run")
    return reference_overrides(tiny_data, tmp_path, "run", stage=1, steps=4)


def test_a_resumed_run_keeps_its_checkpoints_precision(fp32_run, tiny_data, tmp_path):
    base = copy_of(fp32_run, tmp_path, tiny_data)
    run_dir = tmp_path / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "fp32"
    checkpoint = json.loads((run_dir / "checkpoints/step_4/checkpoint.json").read_text())
    assert checkpoint["precision"] == {"precision": "fp32", "requested": "fp32", "reason": "set in the config"}

    proc = run_training(RECIPE, [*base, "train.max_steps=6", "train.precision=auto"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == str(run_dir / "checkpoints/step_4")
    reason = (f"kept from {run_dir / 'checkpoints/step_4'} (a resumed run keeps the precision it was trained in)")
    assert summary["precision"] == {"precision": "fp32", "requested": "auto", "reason": reason}
    assert f"precision fp32 ({reason})" in proc.stdout
    assert summary["peak_flops_precision"] == "fp32" and 0 < summary["mean_mfu"] <= 1


def test_resuming_where_the_checkpoints_precision_cannot_run_is_one_error(fp32_run, tiny_data, tmp_path):
    base = copy_of(fp32_run, tmp_path, tiny_data)
    # As if trained on a GPU in fp16: the checkpoint's identity records the precision it was trained in.
    meta_path = tmp_path / "run/checkpoints/step_4/checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["identity"]["train"]["precision"] = "fp16"
    meta_path.write_text(json.dumps(meta))
    proc = run_training(RECIPE, [*base, "train.max_steps=6"], check=False)
    assert one_error_line(proc).endswith(
        f"error: cannot resume {tmp_path / 'run/checkpoints/step_4'}: it was trained in fp16, which this CPU cannot "
        "run (fp16 cannot run on CPU (DeepSpeed's CPU accelerator has no fp16); use auto (bf16 where this CPU is fast "
        "at it, else fp32), bf16 or fp32); resume on hardware that runs fp16, or start a new run (another run.name)")


def test_fp16_on_cpu_is_one_line(tiny_data, tmp_path):
    proc = run_training(RECIPE, [*reference_overrides(tiny_data, tmp_path, "run", stage=2, steps=2),
                                 "train.precision=fp16"], check=False)
    assert one_error_line(proc).endswith(
        "error: train.precision: fp16 cannot run on CPU (DeepSpeed's CPU accelerator has no fp16); use auto (bf16 "
        "where this CPU is fast at it, else fp32), bf16 or fp32")
    assert not (tmp_path / "run/checkpoints").exists()
