"""The local launcher's command and environment, and the README commands CI depends on."""

import os
import re
import subprocess
import sys
from pathlib import Path

from launcher.__main__ import rank_environment

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_deepspeed_command_with_thread_share():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--nproc", "2",
                          "--dry-run", "train.max_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    threads = max(1, os.cpu_count() // 2)
    pattern = (rf"OMP_NUM_THREADS={threads} \S+/deepspeed --num_gpus 2 --master_port \d+ "
               rf"{re.escape(str(ROOT / 'train/main.py'))} --config configs/quickstart.yaml train.max_steps=5")
    assert re.fullmatch(pattern, out), out


def test_explicit_thread_setting_wins():
    assert rank_environment(2, {"OMP_NUM_THREADS": "3"}) == {}
    assert rank_environment(os.cpu_count() * 2, {}) == {"OMP_NUM_THREADS": "1"}


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

