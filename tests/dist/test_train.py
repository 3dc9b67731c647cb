"""Real 2-rank gloo training runs of train/main.py under the deepspeed launcher."""

from __future__ import annotations

import json
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, TINY_MODEL, read_metrics, run_training

STEPS = 16
# Dropout stays on (GPT-2's default 0.1) and gradients accumulate over 2 micro-batches: resume must restore
# every rank's RNG and the sampler position for the losses to match bit for bit.
RESUME_RUN = [*TINY_MODEL, f"train.max_steps={STEPS}", "train.grad_accum_steps=2", "train.log_every=1",
              "train.eval_every=8", "train.save_every=8", "train.eval_batches=4",
              "train.deepspeed_config=ds_configs/zero2.json", "train.precision=bf16"]


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_training(ROOT / "configs/quickstart.yaml",
                        [*RESUME_RUN, f"data.path={tiny_data['shards']}", f"run.output_dir={out}", "run.name=ref"])
    return out / "ref", proc


def test_two_rank_run_learns_logs_and_checkpoints(reference_run):
    run_dir, proc = reference_run
    metrics = read_metrics(run_dir)
    losses = [metrics[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars("val/loss")] == [8, 16]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(losses[-1], rel=1e-6)

    assert (run_dir / "checkpoints/latest").read_text() == f"step_{STEPS}"
    for rank in (0, 1):
        assert (run_dir / f"checkpoints/step_{STEPS}/rng_rank{rank}.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert summary["tokens_seen"] == STEPS * 4 * 2 * 2 * 64  # steps x micro x accum x ranks x seq_len
    assert summary["final_val_loss"] == pytest.approx(metrics[STEPS]["val/loss"])
    assert f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}" in proc.stdout


def test_kill_9_then_resume_gives_identical_losses(reference_run, tiny_data, tmp_path):
    ref_dir, _ = reference_run
    overrides = [*RESUME_RUN, f"data.path={tiny_data['shards']}", f"run.output_dir={tmp_path}", "run.name=resumed"]
    killed = run_training(ROOT / "configs/quickstart.yaml", overrides, check=False,
                          env={"REPARAM_FAULT_KILL_AT_STEP": "8", "REPARAM_FAULT_KILL_RANK": "1"})
    assert killed.returncode != 0
    run_dir = tmp_path / "resumed"
    assert (run_dir / "checkpoints/latest").read_text() == "step_8"
    assert max(read_metrics(run_dir)) == 8

    resumed = run_training(ROOT / "configs/quickstart.yaml", overrides)
    assert f"resumed from {run_dir / 'checkpoints/step_8'}" in resumed.stdout
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    for step in range(1, STEPS + 1):
        assert got[step]["train/loss"] == ref[step]["train/loss"], step  # exact float equality
        assert got[step]["train/lr"] == ref[step]["train/lr"], step
    assert got[STEPS]["val/loss"] == ref[STEPS]["val/loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_session"] == STEPS - 8 and summary["tokens_seen"] == STEPS * 4 * 2 * 2 * 64


def test_resume_never_refuses_an_existing_run(reference_run, tiny_data):
    ref_dir, _ = reference_run
    proc = run_training(ROOT / "configs/quickstart.yaml",
                        [*RESUME_RUN, f"data.path={tiny_data['shards']}", f"run.output_dir={ref_dir.parent}",
                         "run.name=ref", "run.resume=never"], check=False)
    assert proc.returncode == 2
    assert (f"error: run.resume: 'never' but {ref_dir} already has checkpoint step_{STEPS}; choose another "
            "run.name or set run.resume=auto") in proc.stderr


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_every_zero_preset_trains(preset, tiny_data, tmp_path):
    run_training(ROOT / "configs/quickstart.yaml",
                 [*TINY_MODEL, "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                  f"train.deepspeed_config=ds_configs/{preset}", f"data.path={tiny_data['shards']}",
                  f"run.output_dir={tmp_path}"])
    metrics = read_metrics(tmp_path / "quickstart")
    assert [s for s in metrics if "train/loss" in metrics[s]] == [1, 2, 3]
    assert all(metrics[s]["train/loss"] == metrics[s]["train/loss"] for s in (1, 2, 3))  # finite, not NaN
    assert (tmp_path / "quickstart/checkpoints/latest").read_text() == "step_3"
