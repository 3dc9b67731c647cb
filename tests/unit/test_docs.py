"""The documentation against the repository: CI runs exactly README's test command, its quick start uses shipped
files, and docs/architecture.md has a line for every module of data_prep/, train/ and launcher/ and none for a module
that is gone. Documented commands run as written: tests/cli/test_documented_commands.py."""

from __future__ import annotations

import re

from tests.conftest import ROOT


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
    paths = re.findall(r"--config (\S+)", command)
    assert paths  # the quick start names its recipe
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_the_architecture_doc_lists_every_module_and_no_other():
    text = (ROOT / "docs/architecture.md").read_text()
    for package in ("data_prep", "train", "launcher"):
        section = text.split(f"\n### {package}/\n", 1)[1].split("\n#", 1)[0]
        listed = re.findall(r"^- `(\w+)` — ", section, re.M)
        on_disk = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
        assert on_disk and sorted(listed) == on_disk, (package, sorted(set(listed) ^ set(on_disk)))
