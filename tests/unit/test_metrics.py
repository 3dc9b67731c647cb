"""train.metrics: a progress bar on a terminal, plain log lines otherwise (and on ranks other than 0)."""

from __future__ import annotations

import io
import os
import sys

from train.metrics import Metrics, use_progress_bar


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, monkeypatch):
    assert use_progress_bar(FakeTTY()) and not use_progress_bar(io.StringIO())
    for stream, shown in ((FakeTTY(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        metrics = Metrics(tmp_path / ("tty" if shown else "plain"), enabled=True)
        assert metrics.start_progress(total=10, initial=0) is shown
        metrics.progress(3, {"loss": "1.2345", "tokens/s": "1,024"})
        metrics.print("checkpoint x")
        metrics.close()
        out = stream.getvalue()
        assert "checkpoint x\n" in out
        assert ("3/10" in out and "loss 1.2345 | tokens/s 1,024" in out) is shown
    assert not Metrics(tmp_path / "rank1", enabled=False).start_progress(10, 0)  # other ranks never show one


def test_a_zero_width_terminal_gets_plain_lines(monkeypatch):
    class TTYWithFd(FakeTTY):
        def fileno(self):
            return 1

    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert not use_progress_bar(TTYWithFd())
    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((120, 40)))
    assert use_progress_bar(TTYWithFd())
