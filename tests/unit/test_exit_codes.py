"""train.exit_codes, the one table of exit statuses, and the shell script that has to repeat one of them."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from train import exit_codes


def test_the_batch_scripts_requeue_on_the_trainers_preemption_exit_code():
    """slurm/requeue.sh is shell and repeats the code; it must be the one train/main.py and the launcher exit with."""
    [value] = re.findall(r"^PREEMPTED_EXIT_CODE=(\d+)\b", (ROOT / "slurm/requeue.sh").read_text(), re.M)
    assert int(value) == exit_codes.PREEMPTED
