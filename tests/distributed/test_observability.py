"""One real 2-rank run (quickstart recipe, tiny model, 6 steps): every TensorBoard tag read back with TensorBoard's
own reader, the hparams, summary.json against the event file, the plain log lines and the run report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import ROOT, read_metrics, reference_overrides, run_training

STEPS = 6
TOKENS_PER_STEP = 4 * 2 * 2 * 64  # micro x accum x ranks x seq_len
FLOPS_PER_TOKEN = 6 * (2 * (12 * 64 * 64 + 13 * 64) + 2 * 64 + 512 * 64) + 12 * 2 * 64 * 64  # tests/unit/test_flops.py
RECIPE = ROOT / "configs/quickstart.yaml"


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("obs")
    proc = run_training(RECIPE, [*reference_overrides(tiny_data, out, "obs", stage=2, steps=STEPS),
                                 "checkpoint.every=3", "eval.every=3", "eval.best_metric=val/loss"])
    run_dir = out / "obs"
    return run_dir, proc, EventAccumulator(str(run_dir / "tb")).Reload()


def steps_of(events, tag):
    return [e.step for e in events.Scalars(tag)]


def test_every_tag_is_logged_at_its_steps(run):
    run_dir, _, events = run
    every_step = list(range(1, STEPS + 1))
    for tag in ("train/loss", "train/samples_per_s", "train/mfu", "train/tokens_per_s", "sys/mem_rss_gb",
                "data/epoch", "data/tokens_seen"):
        assert steps_of(events, tag) == every_step, tag
    assert steps_of(events, "val/loss") == [3, 6]
    assert steps_of(events, "ckpt/save_seconds") == [3, 6]  # the step-3 best is also the save_every checkpoint
    assert steps_of(events, "tokens/train_loss") == [s * TOKENS_PER_STEP for s in every_step]
    assert ([e.value for e in events.Scalars("tokens/train_loss")]
            == [e.value for e in events.Scalars("train/loss")])
    assert "sys/gpu_mem_gb" not in events.Tags()["scalars"]  # CPU run

    metrics = read_metrics(run_dir)
    for s in every_step:
        m = metrics[s]
        assert m["train/samples_per_s"] == pytest.approx(m["train/tokens_per_s"] / 64)  # one sample = 64 tokens
        assert 0 < m["train/mfu"] < 1 and 0.1 < m["sys/mem_rss_gb"] < 64
    assert all(0 < e.value < 60 for e in events.Scalars("ckpt/save_seconds"))


def test_hparams_of_the_completed_run(run):
    _, _, events = run
    content = events.PluginTagToContent("hparams")
    assert sorted(content) == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.max_steps"].number_value == STEPS
    assert start.hparams["train.deepspeed_config"].string_value == "ds_configs/zero2.json"
    assert start.hparams["world_size"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {
        "hparams/final_train_loss", "hparams/mean_mfu", "hparams/mean_tokens_per_s", "hparams/best/val/loss",
        "hparams/val/loss", "hparams/val/perplexity"}
    for info in experiment.metric_infos:
        assert steps_of(events, info.name.tag) == [STEPS]


def test_summary_matches_the_event_file(run):
    run_dir, _, events = run
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    assert summary["tokens_seen"] == events.Scalars("data/tokens_seen")[-1].value == STEPS * TOKENS_PER_STEP
    assert summary["flops_per_token"] == FLOPS_PER_TOKEN
    assert summary["peak_flops_per_rank"] > 1e8
    # auto: bf16 on a CPU fast at it, else fp32; MFU is against the peak of the precision the run trained in.
    trained = summary["precision"]["precision"]
    assert summary["precision"]["requested"] == "auto" and trained in ("bf16", "fp32")
    assert summary["peak_flops_precision"] == trained
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[trained]
    assert summary["peak_flops_source"].startswith(f"measured: cpu {dtype} matmul, ")
    assert 0 < summary["mean_mfu"] <= 1
    assert summary["mean_mfu"] == pytest.approx(
        summary["mean_tokens_per_s"] / 2 * FLOPS_PER_TOKEN / summary["peak_flops_per_rank"])
    for s in range(1, STEPS + 1):
        assert metrics[s]["train/mfu"] == pytest.approx(
            metrics[s]["train/tokens_per_s"] / 2 * FLOPS_PER_TOKEN / summary["peak_flops_per_rank"])
    assert summary["peak_rss_gb"] >= max(e.value for e in events.Scalars("sys/mem_rss_gb")) * (1 - 1e-6)
    assert summary["peak_gpu_mem_gb"] is None
    val = {s: metrics[s]["val/loss"] for s in (3, 6)}
    best_step = min(val, key=val.get)
    assert summary["best"] == {"metric": "val/loss", "mode": "min", "value": val[best_step], "step": best_step}
    assert summary["trainable_parameters"] == summary["parameters"]


def test_plain_log_lines_and_the_summary_table(run):
    run_dir, proc, _ = run
    lines = proc.stdout.splitlines()
    summary = json.loads((run_dir / "summary.json").read_text())
    precision = summary["precision"]
    assert f"precision {precision['precision']} ({precision['reason']})" in lines
    assert sum(line.startswith(f"step {s}/{STEPS} | loss ") for line in lines for s in range(1, STEPS + 1)) == STEPS
    rows = lines[lines.index("run summary") + 1:][:10]  # one print: the launcher's lines cannot interleave
    table = dict(line.strip().split("  ", 1) for line in rows)
    table = {name: value.strip() for name, value in table.items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(table) == ["steps", "tokens", "wall time", "tokens/s", "MFU", "peak memory", "best val/loss",
                           "final val/loss", "final val/perplexity", "checkpoint"]
    assert table["steps"] == f"{STEPS}/{STEPS} ({STEPS} this session)"
    assert table["tokens"] == f"{STEPS * TOKENS_PER_STEP:,}"
    assert table["MFU"].startswith(f"{summary['mean_mfu'] * 100:.2f}% of ")
    assert table["peak memory"] == f"{summary['peak_rss_gb']:.2f} GB RSS"
    assert table["best val/loss"] == f"{summary['best']['value']:.4f} at step {summary['best']['step']}"
    assert table["checkpoint"] == str(run_dir / f"checkpoints/step_{STEPS}")


def test_report_png(run):
    run_dir, _, _ = run
    proc = subprocess.run([sys.executable, "-m", "train.report", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
