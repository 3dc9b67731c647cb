"""`python -m train.report RUN_DIR` (its main, in this process): the curves of a run's metrics.jsonl plotted to
report.png, and one `error:` line (exit status 2) for a missing or damaged run directory."""

from __future__ import annotations

import json

from train import report


def test_report_plots_the_curves(tmp_path, capsys):
    lines = [{"step": s, "time": 0.0, "train/loss": 6.0 - s / 2, "train/lr": 1e-3 * s / 4} for s in range(1, 5)]
    lines += [{"step": 2, "time": 0.0, "val/loss": 5.0, "val/perplexity": 148.4},
              {"step": 4, "time": 0.0, "val/loss": 4.5, "val/perplexity": 90.0, "ckpt/save_seconds": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "tokens_seen": 4096, "mean_mfu": 0.02}))
    assert report.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'report.png'}\n"
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_errors(tmp_path, capsys):
    assert (report.main([str(tmp_path / "nope")]), capsys.readouterr().err) == (
        2, f"error: run directory {tmp_path / 'nope'} does not exist\n")
    assert (report.main([str(tmp_path)]), capsys.readouterr().err) == (
        2, f"error: {tmp_path / 'metrics.jsonl'} not found: is {tmp_path} a run directory of train/main.py "
           "(<run.output_dir>/<run.name>)?\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0, "train/loss": 1.0}\nnot json\n')
    assert (report.main([str(tmp_path)]), capsys.readouterr().err) == (
        2, f"error: {tmp_path / 'metrics.jsonl'}:2: not a metrics record\n")
    assert not (tmp_path / "report.png").exists()
