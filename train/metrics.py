"""What a run reports: TensorBoard scalars, a JSON-lines copy of every logged point, and log lines.

Only rank 0 writes; other ranks get a disabled instance so call sites need no rank checks.
`metrics.jsonl` keeps full float precision (TensorBoard stores float32), which is what resume tests compare.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb_dir = Path(run_dir) / "tb"
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        self._jsonl = None
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

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._writer.add_text(tag, text)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self.enabled = False
