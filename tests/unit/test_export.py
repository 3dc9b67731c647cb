"""train.export without training, on a run directory as the trainer leaves it (tests/conftest.py `fake_run`): which
step it exports and the one-line errors for a missing run, checkpoint or tokenizer, and the rules for --output
(never the run, its tokenizer, a parent of either, or a directory it did not write). Exporting trained runs:
tests/distributed/test_export.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, error_of
from train import export as export_lib


@pytest.mark.parametrize("args, expected", [
    (["--step", "seven"], "--step: expected a step number, 'best' or 'latest', got 'seven'"),
    (["--step", "7"], "no checkpoint step_7 (steps on disk: 3)"),
    (["--step", "best"], "no best checkpoint"),
])
def test_export_rejects_an_unknown_step(fake_run, tmp_path, capsys, args, expected):
    out = tmp_path / "export"
    assert export_lib.main([str(fake_run), "--output", str(out), *args]) == 2
    assert expected in error_of(capsys)
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_export_errors_for_a_missing_run_checkpoint_or_tokenizer(fake_run, tmp_path, capsys):
    out = str(tmp_path / "export")
    assert export_lib.main([str(tmp_path / "nope"), "--output", out]) == 2
    assert "no such run directory" in error_of(capsys)
    assert export_lib.main([str(fake_run), "--output", out]) == 2  # no `latest` pointer yet
    assert "no complete checkpoint" in error_of(capsys)
    (fake_run / "checkpoints" / "best").write_text("step_9")
    assert export_lib.main([str(fake_run), "--output", out, "--step", "best"]) == 2
    assert "no checkpoint step_9" in error_of(capsys)
    assert export_lib.main([str(fake_run), "--output", out, "--no-merge"]) == 2
    assert "--no-merge keeps a LoRA adapter" in error_of(capsys)
    manifest = json.loads((fake_run / "data_manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "gone")
    (fake_run / "data_manifest.json").write_text(json.dumps(manifest))
    assert export_lib.main([str(fake_run), "--output", out]) == 2
    assert "is gone" in error_of(capsys)
    assert not (tmp_path / "export").exists()


def test_export_output_rules(fake_run, tmp_path, capsys, monkeypatch):
    def export(output, *extra):
        assert export_lib.main([str(fake_run), "--output", str(output), *extra]) == 2
        return error_of(capsys)

    monkeypatch.chdir(tmp_path)
    assert export(".") == ("error: --output . is the current directory; give a new directory to write the model "
                           "to, e.g. --output models/<name>")
    assert export(".", "--overwrite").startswith("error: --output . is the current directory")
    assert export("..", "--overwrite").startswith("error: --output .. is a parent of the current directory")
    assert export(fake_run, "--overwrite") == (f"error: --output {fake_run} is the run directory {fake_run}; "
                                               "--overwrite never replaces it")
    monkeypatch.chdir(ROOT)
    assert export(tmp_path, "--overwrite") == (f"error: --output {tmp_path} is a directory holding the run directory "
                                               f"{fake_run}; --overwrite never replaces it")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert export(foreign) == (f"error: --output {foreign} exists; choose a new directory or pass --overwrite "
                               "(which replaces only an earlier export)")
    assert export(foreign, "--overwrite") == (
        f"error: --output {foreign} is not an earlier export (no export.json written by train.export); --overwrite "
        "replaces only those. Choose a new directory")
    link = tmp_path / "link"
    link.symlink_to(foreign, target_is_directory=True)
    assert export(link, "--overwrite") == (f"error: --output {link} is a symbolic link; --overwrite replaces only a "
                                           "directory written by train.export")
    tokenizer = json.loads((fake_run / "data_manifest.json").read_text())["tokenizer"]["path"]
    assert export(tokenizer, "--overwrite") == (f"error: --output {tokenizer} holds the run's tokenizer {tokenizer}; "
                                                "--overwrite never replaces it")
    assert (foreign / "thesis.tex").read_text() == "years of work" and fake_run.is_dir()
