"""Commands the documentation gives, run as written: README's `pytest tests` (what CI runs) collects every test file
under tests/, and docs/data_prep.md's DatasetDict sentiment example runs in an empty directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_readme_test_command_collects_every_test_file():
    """pytest skips directories named like build outputs (`dist`, `build`, ...) unless told otherwise: every test
    file under tests/ must be collected by the plain `pytest tests` that CI runs."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert collected == on_disk


def test_docs_datasetdict_sentiment_example_runs_as_written(tmp_path):
    """docs/data_prep.md's sentiment example from a DatasetDict, run in an empty directory exactly as written."""
    text = (ROOT / "docs/data_prep.md").read_text()
    block = re.search(r"<!-- hf-sentiment-example -->\s*```bash\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "data/sentiment/shards/manifest.json").read_text())
    assert manifest["record_kind"] == "classification"
    assert manifest["classification"]["labels"] == ["neg", "pos"]
    assert {s: m["num_docs"] for s, m in manifest["splits"].items()} == {"train": 2000, "val": 200, "test": 200}
    assert manifest["prep"]["splits"]["from_input"] is True
