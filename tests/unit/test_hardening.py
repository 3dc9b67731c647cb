"""Issue 17 (hardening), without training: checkpoint names and links that would make export/predict unpickle a
file outside the run directory, export's --output rules, export.json checksums, one-line errors for a bad ZeRO
preset, an unwritable run directory and an empty prompt, and the launcher's hostfile in a shared temp dir.

Every planted pickle is a live payload: unpickling it creates a marker file (checked once on a copy, so the test
would notice if it ran), and the assertion is that the marker never appears."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_predict import cls_model, error_of, fake_run, lm_model, save_model, tok, write_jsonl  # noqa: F401
from train import checkpoint as ckpt
from train import export as export_lib
from train import predict as predict_lib
from train.errors import ResumeError

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling it creates `marker` (open(marker, "w")): what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_evil_checkpoint(root: Path, marker: Path, step: int = 9) -> Path:
    """A checkpoint outside the run dir that passes every content check: payload files with a checkpoint.json
    recording their true sizes and checksums."""
    evil = root / "evil" / f"step_{step}"
    evil.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"):
        torch.save(Payload(marker), evil / name)
    ckpt.write_manifest(evil, {"step": step})
    assert ckpt.verify(evil) is None
    probe = root / "probe"
    shutil.copy(evil / "mp_rank_00_model_states.pt", probe)
    torch.load(probe, weights_only=False)  # the payload is live...
    assert marker.exists()
    marker.unlink()  # ...and the marker is cleared for the real test
    return evil


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    return plant_evil_checkpoint(tmp_path, marker), marker


# ------------------------------------------------------------------------------------------------ item 1


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


def test_checkpointer_best_tag_refuses_a_bad_pointer(tmp_path):
    """What the trainer's test-split scoring (Evaluator.final_results) calls before loading the best weights."""
    (tmp_path / "best").write_text("../../evil/step_9")
    with pytest.raises(ResumeError, match=r"holds '\.\./\.\./evil/step_9', not a checkpoint name"):
        ckpt.Checkpointer(tmp_path, rank=0).best_tag()
    with pytest.raises(ResumeError, match="is not a checkpoint name"):
        ckpt.Checkpointer(tmp_path, rank=0).checked("../evil/step_9")


# ------------------------------------------------------------------------------------------------ item 2


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


def test_predict_checks_the_export_json_checksums(cls_model, tmp_path, capsys):
    model = tmp_path / "exported"
    shutil.copytree(cls_model, model)
    checksums = {p.name: ckpt.file_checksum(p) for p in sorted(model.iterdir()) if p.is_file()}
    (model / "export.json").write_text(json.dumps({"format": "full", "task": "classification", ckpt.CHECKSUM: checksums}))
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}])
    assert predict_lib.main([str(model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 0
    capsys.readouterr()
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert predict_lib.main([str(model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert error_of(capsys) == (f"error: {weights}: content differs from its checksum in export.json (changed or "
                                "damaged since the export); export the run again")


# ------------------------------------------------------------------------------------------------ item 4


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


# ------------------------------------------------------------------------------------------------ item 5


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


def test_an_empty_prompt_is_one_line_naming_the_input_line(lm_model, cls_model, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}, {"text": ""}])
    out = tmp_path / "o.jsonl"
    assert predict_lib.main([str(lm_model), "--input", str(path), "--output", str(out), "--prompt-field",
                             "text", "--max-new-tokens", "8"]) == 2
    assert error_of(capsys) == (f"error: {path}:2: the prompt (text) is empty: it encodes to no tokens, so there is "
                                "nothing to continue")
    assert not out.exists()
    # classification of an empty text is defined (it encodes to [eos], as data_prep encodes it)
    assert predict_lib.main([str(cls_model), "--input", str(path), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------ item 3


def test_the_hostfile_is_never_written_through_a_planted_link(tmp_path):
    shared_tmp = tmp_path / "shared_tmp"
    shared_tmp.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    hosts = [("n1", 1), ("n2", 1)]
    text = "".join(f"{host}:{slots}," for host, slots in hosts)
    old_name = f"reparam-hostfile-{hashlib.sha1(text.encode()).hexdigest()[:12]}"  # the path used before issue 17
    (shared_tmp / old_name).symlink_to(victim)
    (shared_tmp / "reparam-hostfile").symlink_to(victim)
    env = {**os.environ, "TMPDIR": str(shared_tmp)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--dry-run",
                           "--nodes", "n1,n2", "--node-rank", "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    hostfile = Path(proc.stdout.split("--hostfile ", 1)[1].split()[0])
    assert victim.read_text() == "precious\n"
    assert hostfile.parent.parent == shared_tmp and hostfile.parent.name.startswith("reparam-hostfile-")
    assert not hostfile.is_symlink() and hostfile.read_text() == "n1 slots=1\nn2 slots=1\n"
    assert stat.S_IMODE(hostfile.parent.stat().st_mode) == 0o700 and stat.S_IMODE(hostfile.stat().st_mode) == 0o600


def test_a_local_run_rendezvous_is_on_loopback():
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--config", "configs/quickstart.yaml", "--dry-run",
                           "--nproc", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert " GLOO_SOCKET_IFNAME=lo " in proc.stdout and " --master_addr 127.0.0.1 --master_port " in proc.stdout
