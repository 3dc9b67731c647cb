"""train.checkpoint without training: checkpoint.json verification (sizes and checksums), retention, and which
checkpoint is read: the `latest`/`best` pointers and symbolic links that would make export, predict or the trainer
unpickle a file from outside the run directory (exercised through `train.export` and `train.predict`).

Every planted pickle is a live payload (tests/conftest.py `evil`); the assertion is that its marker never appears."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import error_of, write_jsonl
from train import checkpoint as ckpt
from train import export as export_lib
from train import predict as predict_lib
from train.errors import ResumeError

# -------------------------------------------------------------------------------------------------------- verification


def test_checkpoint_verification_names_the_bad_file(tmp_path):
    tmp_path = tmp_path / "step_3"  # a checkpoint directory is named step_<N>
    tmp_path.mkdir()
    (tmp_path / "a.pt").write_bytes(b"12345")
    assert ckpt.verify(tmp_path) == "no checkpoint.json (the save did not finish)"
    (tmp_path / ckpt.MANIFEST).write_text(json.dumps({"files": {"a.pt": 5, "b.pt": 1}}))
    assert ckpt.verify(tmp_path) == "b.pt is missing"
    (tmp_path / "b.pt").write_bytes(b"")
    assert ckpt.verify(tmp_path) == "b.pt has 0 bytes, checkpoint.json records 1"
    (tmp_path / "b.pt").write_bytes(b"x")
    assert ckpt.verify(tmp_path) is None


def test_verify_names_the_file_whose_content_changed_at_the_same_size(tmp_path):
    directory = tmp_path / "step_4"
    directory.mkdir()
    (directory / "a.pt").write_bytes(os.urandom(5000))
    (directory / "b.pt").write_bytes(os.urandom(5000))
    ckpt.write_manifest(directory, {"step": 4})
    assert ckpt.verify(directory) is None
    with open(directory / "b.pt", "r+b") as f:
        f.seek(1000)
        f.write(bytes(400))
    assert ckpt.verify(directory) == "b.pt: content differs from its checksum in checkpoint.json"
    (directory / "extra.pt").write_bytes(b"x")
    assert ckpt.verify(directory) == "extra.pt is not recorded in checkpoint.json"
    (directory / "extra.pt").unlink()
    (directory / "b.pt").unlink()
    assert ckpt.verify(directory) == "b.pt is missing"


# ----------------------------------------------------------------------------------------------------------- retention


def test_checkpoint_retention_keeps_last_n_every_m_and_newest(tmp_path):
    for step in (2, 4, 6, 8, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "step_14.partial").mkdir()
    ckpt.Checkpointer(tmp_path, rank=0, keep_last=2, keep_every=4)._apply_retention(newest=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_12", "step_14.partial", "step_4",
                                                         "step_8"]


def test_checkpoint_retention_never_deletes_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
    checkpointer = ckpt.Checkpointer(tmp_path, rank=0, keep_last=1)
    checkpointer.mark_best(4)
    assert checkpointer.best_tag() == "step_4"
    checkpointer._apply_retention(newest=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_12", "step_4"]


# -------------------------------------------------------------------------------------------------- pointers and links


def test_checkpointer_best_tag_refuses_a_bad_pointer(tmp_path):
    """What the trainer's test-split scoring (Evaluator.final_results) calls before loading the best weights."""
    (tmp_path / "best").write_text("../../evil/step_9")
    with pytest.raises(ResumeError, match=r"holds '\.\./\.\./evil/step_9', not a checkpoint name"):
        ckpt.Checkpointer(tmp_path, rank=0).best_tag()
    with pytest.raises(ResumeError, match="is not a checkpoint name"):
        ckpt.Checkpointer(tmp_path, rank=0).checked("../evil/step_9")


@pytest.mark.parametrize("pointer", ["../../../evil/step_9", "../../evil/step_9", "/abs/step_9", "step_9/..",
                                     "step_09", "step_9\n../x", "step_-1"])
def test_export_best_pointer_outside_the_run_is_refused(fake_run, evil, tmp_path, capsys, pointer):
    _, marker = evil
    (fake_run / "checkpoints" / "best").write_text(pointer)
    out = tmp_path / "export"
    assert export_lib.main([str(fake_run), "--output", str(out), "--step", "best"]) == 2
    message = error_of(capsys)
    assert message == (f"error: --step best: {fake_run / 'checkpoints/best'} holds {pointer!r}, not a checkpoint name "
                       "(step_<N>); refusing to load it (use --step latest or a step number)")
    assert not marker.exists() and not out.exists()


def test_predict_on_a_run_dir_with_a_planted_best_pointer_is_refused(fake_run, evil, tmp_path, capsys):
    _, marker = evil
    (fake_run / "checkpoints" / "best").write_text("../../../evil/step_9")
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}])
    assert predict_lib.main([str(fake_run), "--input", str(path), "--output", str(tmp_path / "o.jsonl"),
                             "--step", "best"]) == 2
    assert "not a checkpoint name (step_<N>); refusing to load it" in error_of(capsys)
    assert not marker.exists()


def test_a_symlinked_step_dir_or_file_is_refused_by_export(fake_run, evil, tmp_path, capsys):
    evil_dir, marker = evil
    checkpoints = fake_run / "checkpoints"
    (checkpoints / "step_9").symlink_to(evil_dir, target_is_directory=True)
    out = tmp_path / "export"
    assert export_lib.main([str(fake_run), "--output", str(out), "--step", "9"]) == 2
    assert error_of(capsys) == (
        f"error: {checkpoints / 'step_9'}: refusing this checkpoint, it is incomplete, damaged or not the run's own: "
        "it is a symbolic link (checkpoints are read only from inside the run directory)")
    # a real directory whose files are links to the payload
    real = checkpoints / "step_10"
    real.mkdir()
    for f in evil_dir.iterdir():
        (real / f.name).symlink_to(f)
    assert export_lib.main([str(fake_run), "--output", str(out), "--step", "10"]) == 2
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt is a symbolic link" in error_of(capsys)
    assert not marker.exists() and not out.exists()


def test_a_planted_latest_pointer_falls_back_with_a_warning(fake_run, evil, tmp_path, capsys):
    _, marker = evil
    checkpoints = fake_run / "checkpoints"
    (checkpoints / "latest").write_text("../../evil/step_9")
    (checkpoints / "step_9").symlink_to(tmp_path / "evil/step_9", target_is_directory=True)
    assert export_lib.main([str(fake_run), "--output", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert (f"warning: ignoring {checkpoints / 'latest'} holds '../../evil/step_9', not a checkpoint name "
            "(step_<N>); resuming from the newest checkpoint on disk that checks out") in err
    assert (f"warning: skipping checkpoint {checkpoints / 'step_9'}: it is a symbolic link (checkpoints are read "
            "only from inside the run directory)") in err
    # it fell back to the run's own (empty) step_3, which is not a DeepSpeed checkpoint
    assert "step_3: neither ZeRO optimizer partitions" in err.strip().splitlines()[-1]
    assert not marker.exists()
    # a symlinked pointer file is not followed either
    (checkpoints / "latest").unlink()
    (checkpoints / "latest").symlink_to(tmp_path / "evil/step_9/checkpoint.json")
    assert export_lib.main([str(fake_run), "--output", str(tmp_path / "export")]) == 2
    assert f"warning: ignoring {checkpoints / 'latest'} is a symbolic link" in capsys.readouterr().err
    assert not marker.exists()
