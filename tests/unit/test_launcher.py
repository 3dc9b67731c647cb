"""launcher.__main__ in this process: the environment each rank gets (its share of the cores as OMP_NUM_THREADS unless
set, the project root on PYTHONPATH). The launcher as a command: tests/cli/test_launcher.py; with real ranks:
tests/distributed/test_launcher.py."""

from __future__ import annotations

import os

from launcher.__main__ import rank_environment
from tests.conftest import ROOT


def test_explicit_thread_setting_wins_and_pythonpath_is_kept():
    assert rank_environment(2, {"OMP_NUM_THREADS": "3", "PYTHONPATH": "/x"}) == {"PYTHONPATH": f"{ROOT}:/x"}
    assert rank_environment(os.cpu_count() * 2, {})["OMP_NUM_THREADS"] == "1"
