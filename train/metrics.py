"""What a run reports: TensorBoard scalars, a JSON-lines copy of every logged point, and log lines or a progress
bar.

Only rank 0 writes; other ranks get a disabled instance so call sites need no rank checks.
`metrics.jsonl` keeps full float precision (TensorBoard stores float32), which is what resume tests compare.
The tag list and summary fields are documented in docs/observability.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from train import run_dir as layout


def use_progress_bar(stream=None) -> bool:
    """A progress bar replaces the per-step log lines only on an interactive terminal; Slurm logs, pipes and tests
    get the plain lines, and so does a terminal of width 0 (some pseudo-terminals), where tqdm draws nothing."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):  # no file descriptor to ask: trust isatty
        return True


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb_dir = Path(run_dir) / layout.TENSORBOARD
        self.jsonl_path = Path(run_dir) / layout.METRICS
        self._writer = None
        self._jsonl = None
        self._bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir))
            self._jsonl = open(self.jsonl_path, "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()

    def log_tb(self, x: int, scalars: dict[str, float]) -> None:
        """TensorBoard only, on another x axis than the step (e.g. tokens seen); metrics.jsonl is keyed by step."""
        if self.enabled:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=x)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._writer.add_text(tag, text)

    def hparams(self, hparams: dict, final: dict[str, float], step: int) -> None:
        """The run's settings and final metrics for TensorBoard's HParams dashboard, in the run's own event file
        (SummaryWriter.add_hparams would open a second run directory)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        final = {tag: value for tag, value in final.items() if value is not None}
        experiment, session_start, session_end = hparams_summary(hparams, final)
        file_writer = self._writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
        for tag, value in final.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    # ------------------------------------------------------------------------------------------- console
    def start_progress(self, total: int, initial: int) -> bool:
        """Open a progress bar on an interactive terminal; returns whether one is shown."""
        if self.enabled and use_progress_bar():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", file=sys.stdout, dynamic_ncols=True)
        return self._bar is not None

    def progress(self, step: int, postfix: dict | None = None) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(" | ".join(f"{k} {v}" for k, v in postfix.items()), refresh=False)
            self._bar.update(step - self._bar.n)

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self.end_progress()
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self.enabled = False
