"""What to do about a step whose loss or gradients were not finite: skip its update, or roll back.

DeepSpeed skips an update whose gradients overflow; a few isolated skips are harmless. Too many in a row, or one
that was applied anyway (fp32 on ZeRO-0 has no overflow check, so the weights may be corrupted), call for a
rollback to the last checkpoint with the offending global batches marked never to be trained on again. Too many
rollbacks stop the run with a report. The counters travel in the checkpoint.
"""

from __future__ import annotations

import enum

from train.config import TrainConfig
from train.errors import RunError


class Action(enum.Enum):
    SKIP = "skip"  # the update was skipped; carry on
    ROLL_BACK = "roll_back"  # restore the last checkpoint and never train on `bad_batches` again


class NonFiniteGuard:
    def __init__(self, train: TrainConfig):
        self.max_in_a_row, self.max_rollbacks = train.nonfinite_max_in_a_row, train.nonfinite_max_rollbacks
        self.nonfinite_steps = 0  # steps whose loss or gradients were not finite
        self.rollbacks = 0
        self.bad_batches: list[tuple[int, int]] = []  # the current run of non-finite steps, as sampler step starts

    def finite(self) -> None:
        """A step with a finite loss and an applied update ends a run of non-finite ones."""
        self.bad_batches.clear()

    def nonfinite(self, step: int, batch_start: tuple[int, int], applied: bool) -> tuple[Action, str]:
        """(what to do, why) about non-finite `step`, whose global batch started at `batch_start` and whose update
        was or was not `applied`; RunError when the rollbacks are used up."""
        self.nonfinite_steps += 1
        self.bad_batches.append(batch_start)
        in_a_row = len(self.bad_batches)
        if not applied and in_a_row < self.max_in_a_row:
            return Action.SKIP, f"non-finite loss or gradients, update skipped ({in_a_row} in a row)"
        reason = ("non-finite loss or gradients and this ZeRO stage applied the update" if applied else
                  f"{in_a_row} steps in a row with non-finite loss or gradients")
        if self.rollbacks >= self.max_rollbacks:
            raise RunError(f"step {step}: {reason}; stopping after {self.rollbacks} rollbacks "
                           f"(train.nonfinite_max_rollbacks). {self.nonfinite_steps} non-finite steps so far; "
                           "lower optim.lr, raise optim.warmup_steps or check the data")
        return Action.ROLL_BACK, reason

    def rolled_back(self, before: dict) -> None:
        """A rollback restored the checkpoint's counters: count on from `before` (the state_dict taken just before
        it), one rollback more."""
        self.nonfinite_steps, self.rollbacks = before["nonfinite_steps"], before["rollbacks"] + 1
        self.bad_batches.clear()

    def no_checkpoint(self, step: int, reason: str) -> RunError:
        return RunError(f"step {step}: {reason}, and there is no checkpoint to roll back to; lower optim.lr or save "
                        "checkpoints earlier (checkpoint.every)")

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_steps, self.rollbacks = state["nonfinite_steps"], state["rollbacks"]
