"""Best-checkpoint tracking and early stopping on one validation metric.

Pure state (no I/O): the Trainer feeds it each validation result, saves a checkpoint when it reports a new best,
and stops when `should_stop`. Its state travels in the checkpoint, so a resumed run keeps counting patience from
where it was instead of starting over.
"""

from __future__ import annotations

import math


class BestTracker:
    def __init__(self, metric: str, mode: str, patience: int):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0

    def update(self, step: int, value: float) -> bool:
        """Record one validation result; True if it is a new best. A NaN never is."""
        better = not math.isnan(value) and (
            self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value))
        if better:
            self.best_value, self.best_step = value, step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return better

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best_value": self.best_value, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        # A resumed run may change the metric or mode (not architecture); the old best then means nothing.
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            return
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
