"""`python train/main.py` as its own process, before any rank starts: a config or ZeRO preset a user got wrong and
an unwritable run directory each give exit status 2 and exactly one `error:` line on stderr (no traceback), and
nothing is created."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def main_py(*overrides: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train/main.py", "--config", "configs/quickstart.yaml", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset, error", [
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ({"zero_optimization": {"stage": "2"}}, "zero_optimization.stage must be 0, 1, 2 or 3, got '2'"),
    ({"zero_optimization": 2}, "zero_optimization must be a JSON object, got 2"),
    ([{"zero_optimization": {"stage": 2}}], "a DeepSpeed preset is a JSON object ({...}), got a list"),
])
def test_a_bad_zero_preset_is_one_line_before_any_process_starts(tmp_path, preset, error):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(preset))
    proc = main_py(f"train.deepspeed_config={path}", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {path}: {error}", proc.stderr
    assert not (tmp_path / "quickstart").exists()  # stopped before the run directory was made


def test_an_unwritable_run_dir_is_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the directory immutable instead
        if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i")
    else:
        run_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        proc = main_py(f"run.output_dir={tmp_path}", "run.name=ro")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run_dir)], check=True)
        run_dir.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_dir} is not writable (") and lines[0].endswith(
        f"): the run directory {run_dir} must be writable by this user (fix its permissions, or choose another "
        "run.output_dir or run.name)"), proc.stderr


@pytest.mark.parametrize("text, overrides, message", [
    ("data: {path: shards}\ntrain: {max_steps: 3}\ntrain: {log_every: 1}\n", [],
     "duplicate key 'train' at lines 2 and 3"),
    ("- data\n", [], "must be a YAML mapping of sections"),
    ("data: {path: shards}\n", ["train.max_steps=["], "override 'train.max_steps=[': the value is not valid YAML"),
    ("data: {path: shards}\n", ["optim.betas=[a, b]"], "optim.betas: must be two numbers in [0, 1), got ['a', 'b']"),
])
def test_main_prints_one_error_line_and_exits_2(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    proc = subprocess.run([sys.executable, "train/main.py", "--config", str(path), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
