"""Real 2-rank gloo training runs of train/main.py under the deepspeed launcher: learning, logging, preemption; and one
rank started with plain `python train/main.py`."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, read_metrics, reference_overrides, run_training
from train.checkpoint import verify

STEPS = 12
RECIPE = ROOT / "configs/quickstart.yaml"


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_training(RECIPE, reference_overrides(tiny_data, out, "ref", stage=2, steps=STEPS))
    return out / "ref", proc


def test_two_rank_run_learns_logs_and_checkpoints(reference_run):
    run_dir, proc = reference_run
    metrics = read_metrics(run_dir)
    losses = [metrics[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars("val/loss")] == [4, 8, 12]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(losses[-1], rel=1e-6)

    assert (run_dir / "checkpoints/latest").read_text() == f"step_{STEPS}"
    for rank in (0, 1):
        assert (run_dir / f"checkpoints/step_{STEPS}/rng_rank{rank}.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert summary["tokens_seen"] == STEPS * 4 * 2 * 2 * 64  # steps x micro x accum x ranks x seq_len
    assert summary["final_val_loss"] == pytest.approx(metrics[STEPS]["val/loss"])
    assert f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}" in proc.stdout


def test_resume_never_refuses_an_existing_run(reference_run, tiny_data):
    ref_dir, _ = reference_run
    proc = run_training(RECIPE, [*reference_overrides(tiny_data, ref_dir.parent, "ref", stage=2, steps=STEPS),
                                 "run.resume=never"], check=False)
    assert proc.returncode == 2
    assert (f"error: run.resume: 'never' but {ref_dir} already has checkpoint step_{STEPS}; choose another "
            "run.name or set run.resume=auto") in proc.stderr


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preemption_signal_saves_exits_75_and_resumes_exactly(sig, reference_run, tiny_data, tmp_path):
    ref_dir, _ = reference_run
    overrides = reference_overrides(tiny_data, tmp_path, "pre", stage=2, steps=STEPS)
    # The signal reaches rank 1 only, after step 5: both ranks agree at the end of step 6 and save it.
    preempted = run_training(RECIPE, overrides, check=False, env={
        "REPARAM_FAULT_AT_STEP": "5", "REPARAM_FAULT_RANK": "1", "REPARAM_FAULT_SIGNAL": sig})
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    run_dir = tmp_path / "pre"
    assert (run_dir / "checkpoints/latest").read_text() == "step_6"
    assert "preempted (signal on another rank) at step 6: checkpoint" in preempted.stdout
    assert json.loads((run_dir / "summary.json").read_text())["preempted"] is True
    if sig == "TERM":
        return
    run_training(RECIPE, overrides)
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert [got[s]["train/loss"] for s in range(1, STEPS + 1)] == [ref[s]["train/loss"] for s in range(1, STEPS + 1)]


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_checkpoint(reference_run, tiny_data):
    ref_dir, _ = reference_run
    before = (ref_dir / f"checkpoints/step_{STEPS}/checkpoint.json").stat().st_mtime_ns
    proc = run_training(RECIPE, reference_overrides(tiny_data, ref_dir.parent, "ref", stage=2, steps=STEPS))
    assert f"resumed from {ref_dir / f'checkpoints/step_{STEPS}'}" in proc.stdout
    summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["steps_this_session"] == 0 and summary["checkpoint"] == str(ref_dir / f"checkpoints/step_{STEPS}")
    assert (ref_dir / f"checkpoints/step_{STEPS}/checkpoint.json").stat().st_mtime_ns == before


def test_a_signal_during_a_save_leaves_it_intact_and_preempts_after(reference_run, tiny_data, tmp_path):
    """USR1 arrives while the step-8 checkpoint is being written: the save completes untouched, the ranks stop at
    the end of step 9 with a second checkpoint, and the resumed run matches the uninterrupted one."""
    ref_dir, _ = reference_run
    overrides = reference_overrides(tiny_data, tmp_path, "pre", stage=2, steps=STEPS)
    preempted = run_training(RECIPE, overrides, check=False, env={
        "REPARAM_FAULT_AT_STEP": "8", "REPARAM_FAULT_PHASE": "in_save", "REPARAM_FAULT_SIGNAL": "USR1"})
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    checkpoints = tmp_path / "pre/checkpoints"
    assert (checkpoints / "latest").read_text() == "step_9"
    assert verify(checkpoints / "step_8") is None and verify(checkpoints / "step_9") is None
    assert "preempted (SIGUSR1) at step 9: checkpoint" in preempted.stdout
    run_training(RECIPE, overrides)
    ref, got = read_metrics(ref_dir), read_metrics(tmp_path / "pre")
    assert [got[s]["train/loss"] for s in range(1, STEPS + 1)] == [ref[s]["train/loss"] for s in range(1, STEPS + 1)]


def test_training_on_a_blend_samples_its_parts_and_reports_the_shares(blend_spec, tiny_data, tmp_path):
    proc = run_training(RECIPE, [*reference_overrides(tiny_data, tmp_path, "blend", stage=2, steps=4),
                                 f"data.path={blend_spec}", "eval.every=2"])
    summary = json.loads((tmp_path / "blend/summary.json").read_text())
    assert [part["weight"] for part in summary["blend"]] == [0.75, 0.25]
    assert all(abs(part["realised"] - part["weight"]) < 0.03 for part in summary["blend"])
    assert f"blend: {tiny_data['shards']} weight 0.7500, realised" in proc.stdout
    metrics = read_metrics(tmp_path / "blend")
    assert summary["steps"] == 4 and "val/loss" in metrics[2] and "val/loss" in metrics[4]


def test_plain_python_without_a_launcher_trains_as_one_rank(tiny_data, tmp_path):
    run_training(RECIPE, reference_overrides(tiny_data, tmp_path, "solo", stage=2, steps=2), num_ranks=1)
    summary = json.loads((tmp_path / "solo/summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (1, 2)
