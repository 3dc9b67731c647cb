"""Issue 17 (hardening) on real 2-rank runs: a checkpoint file whose bytes changed at the same size, a planted
`latest` pointer and a symlinked step directory holding a live pickle payload, and `train.export --overwrite`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import ROOT, reference_overrides, run_training
from tests.unit.test_hardening import Payload
from train import checkpoint as ckpt
from train import export as export_lib

STEPS = 12
RECIPE = ROOT / "configs/quickstart.yaml"
OPTIM = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """A 12-step ZeRO-2 run with checkpoints at 4, 8 and 12."""
    out = tmp_path_factory.mktemp("hardening")
    run_training(RECIPE, reference_overrides(tiny_data, out, "zero2", stage=2, steps=STEPS))
    return out / "zero2"


def test_checkpoint_json_records_sizes_and_checksums(reference):
    manifest = json.loads((reference / "checkpoints/step_12/checkpoint.json").read_text())
    assert manifest["files"].keys() == manifest["xxh3_128"].keys() and OPTIM in manifest["files"]
    path = reference / "checkpoints/step_12" / OPTIM
    assert manifest["xxh3_128"][OPTIM] == ckpt.file_checksum(path)


def test_changed_bytes_in_an_optimizer_file_resume_from_the_previous_checkpoint(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    optim = run_dir / "checkpoints/step_12" / OPTIM
    size = optim.stat().st_size
    with open(optim, "r+b") as f:
        f.seek(size // 2)
        original = f.read(400)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in original))
    assert optim.stat().st_size == size
    proc = run_training(RECIPE, reference_overrides(tiny_data, tmp_path, "run", stage=2, steps=STEPS + 4))
    assert (f"warning: skipping checkpoint {run_dir / 'checkpoints/step_12'}: {OPTIM}: content differs from its "
            "checksum in checkpoint.json") in proc.stderr
    assert f"resumed from {run_dir / 'checkpoints/step_8'}" in proc.stdout
    assert (run_dir / "checkpoints/latest").read_text() == "step_16"


def test_a_planted_latest_and_a_symlinked_step_dir_are_never_unpickled(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    marker = tmp_path / "PAYLOAD_RAN"
    # A copy of step_12 outside the run, its optimizer partition replaced by a payload, and a checkpoint.json
    # recording the payload's true size and checksum: only the confinement rules stop it.
    evil = tmp_path / "evil/step_12"
    shutil.copytree(run_dir / "checkpoints/step_12", evil)
    torch.save(Payload(marker), evil / OPTIM)
    ckpt.write_manifest(evil, json.loads((evil / "checkpoint.json").read_text()))
    assert ckpt.verify(evil) is None
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_12")
    (checkpoints / "step_12").symlink_to(evil, target_is_directory=True)
    (checkpoints / "latest").write_text("../../evil/step_12")

    proc = run_training(RECIPE, reference_overrides(tiny_data, tmp_path, "run", stage=2, steps=STEPS + 4))
    assert (f"warning: ignoring {checkpoints / 'latest'} holds '../../evil/step_12', not a checkpoint name "
            "(step_<N>); resuming from the newest checkpoint on disk that checks out") in proc.stderr
    assert (f"warning: skipping checkpoint {checkpoints / 'step_12'}: it is a symbolic link (checkpoints are read "
            "only from inside the run directory)") in proc.stderr
    assert f"resumed from {checkpoints / 'step_8'}" in proc.stdout
    assert not marker.exists()
    # the re-saved step_12 replaced the link, never writing through it
    assert (checkpoints / "step_12").is_dir() and not (checkpoints / "step_12").is_symlink()
    assert ckpt.verify(evil) is None and (checkpoints / "latest").read_text() == "step_16"


def test_export_overwrite_replaces_an_earlier_export_only(reference, tmp_path, capsys):
    out = tmp_path / "model"
    assert export_lib.main([str(reference), "--output", str(out), "--step", "8"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["checkpoint"] == "step_8" and "model.safetensors" in info["xxh3_128"]
    assert export_lib.main([str(reference), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["checkpoint"] == "step_12"
    capsys.readouterr()
    assert export_lib.main([str(reference), "--output", str(reference / "checkpoints"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output {reference / 'checkpoints'} is not an earlier export "
                                               "(no export.json written by train.export); --overwrite replaces only "
                                               "those. Choose a new directory")
    assert (reference / "checkpoints/step_12").is_dir()
