"""data_prep.progress: off a terminal, a plain log line with rates and an ETA."""

from __future__ import annotations

from data_prep import progress


def test_progress_logs_rates_and_eta_when_not_a_tty(monkeypatch, capsys):
    import re

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.Progress("tokenize", total=4_000_000)
    bar.advance(10, 1_000_000, 5_000)
    err = capsys.readouterr().err
    assert re.fullmatch(r"data_prep: tokenize: 10 docs \([\d,]+/s\), 5,000 tokens \([\d,]+/s\), 1\.0 MB "
                        r"\([\d.]+ MB/s\), ETA \d+ s\n", err), err
