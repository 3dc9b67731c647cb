"""Evaluation during and after training: validation cadence, the best checkpoint and early stopping
(`train.best.BestTracker`), the test split scored with the starting model and with the best (or final) one, and
results.json.

What is computed from the logits is `train.tasks`' business; which items each rank scores is
`train.data.eval_batches`'. State (the tracker, the starting model's test metrics) travels in the checkpoint, so a
resumed run keeps counting patience and still reports the gain over the model it started from.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist

from data_prep.files import write_atomic
from train import run_dir as layout
from train import tasks
from train.best import BestTracker
from train.config import Config
from train.data import IGNORE, eval_batches
from train.engine import forward
from train.errors import ConfigError
from train.metrics import Metrics


def describe(metrics: dict[str, float]) -> str:
    return " | ".join(f"{name} {value:.4f}" for name, value in metrics.items())


class Evaluator:
    def __init__(self, cfg: Config, engine, metrics: Metrics, val_items, test_items, num_labels: int, rank: int,
                 world_size: int):
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.val_items, self.test_items = val_items, test_items
        self.kind, self.num_labels = cfg.task.kind, num_labels
        self.rank, self.world_size = rank, world_size
        e = cfg.eval
        self.best = BestTracker(e.best_metric, e.best_mode, e.early_stopping_patience) if e.best_metric else None
        self.test_before: dict | None = None  # test metrics of the starting model
        self.last: tuple[int, dict] | None = None  # (step, metrics) of the latest validation pass

    @property
    def stopped_early(self) -> bool:
        return bool(self.best and self.best.should_stop)

    def due(self, step: int, at_epoch_end: bool) -> bool:
        """Whether to validate after `step` (not the last one: the run validates at its end anyway)."""
        e = self.cfg.eval
        return bool(e.every and step % e.every == 0) or (e.at_epoch_end and at_epoch_end)

    @torch.no_grad()
    def evaluate(self, items, split: str) -> dict[str, float]:
        """Metrics of one pass over `items` (eval.batches rounds, or all), named `<split>/<metric>`. Collective."""
        self.engine.eval()
        sums = tasks.EvalSums(self.kind, self.num_labels, self.engine.device)
        micro_batch = self.cfg.train.micro_batch_size
        for indices in eval_batches(len(items), micro_batch, self.world_size, self.rank, self.cfg.eval.batches):
            # A rank with nothing left still runs a forward pass (ZeRO-3 gathers collectively) and counts nothing.
            batch, _ = items.model_batch(indices if len(indices) else np.array([len(items) - 1]))
            labels = batch.pop("labels")
            if not len(indices):
                labels.fill_(IGNORE)
            sums.add(forward(self.engine, batch), labels.to(self.engine.device))
        dist.all_reduce(sums.sums)
        self.engine.train()
        metrics = sums.metrics()
        if not metrics:
            raise ConfigError(f"data.{split}_split: fewer than micro_batch_size x world size = "
                              f"{micro_batch * self.world_size} items to evaluate; use a larger split, "
                              f"eval.batches=0, or disable it with data.{split}_split=''")
        return {f"{split}/{name}": value for name, value in metrics.items()}

    def validate(self, step: int) -> bool:
        """Validate (if there is a validation split), log, and track the best; whether `step` is a new best."""
        if self.val_items is None:
            return False
        metrics = self.evaluate(self.val_items, "val")
        self.last = (step, metrics)
        self.metrics.log(step, metrics)
        self.metrics.print(f"step {step} | {describe(metrics)}")
        if not self.best:
            return False
        if self.best.metric not in metrics:
            raise ConfigError(f"eval.best_metric: {self.best.metric} is not reported for task.kind {self.kind}; "
                              f"choose one of {', '.join(metrics)}")
        return self.best.update(step, metrics[self.best.metric])

    def validated_at(self, step: int) -> bool:
        return self.last is not None and self.last[0] == step

    def test_starting_model(self, step: int) -> None:
        """Score the test split with the model the run starts from (once: kept across resumes)."""
        if self.test_items is None or self.test_before is not None or step != 0:
            return
        self.test_before = self.evaluate(self.test_items, "test")
        self.metrics.log(step, self.test_before)
        self.metrics.print(f"test with the starting model: {describe(self.test_before)}")

    def final_results(self, step: int, checkpoints) -> dict:
        """Score the test split with the best checkpoint's weights (the final ones when no best is tracked; the
        engine keeps them afterwards) and write results.json. `checkpoints` is the run's CheckpointManager."""
        best_tag = checkpoints.best_tag() if self.best else None
        results = {"task": self.kind, "steps": step, "stopped_early": self.stopped_early,
                   "best": ({**self.best.state_dict(), "checkpoint": str(checkpoints.directory / best_tag)}
                            if best_tag else None),
                   "val_final": self.last[1] if self.last else None}
        if self.test_items is not None:
            if best_tag and self.best.best_step != step:
                checkpoints.load_weights(self.engine, best_tag)
            test_after = self.evaluate(self.test_items, "test")
            self.metrics.log(step, test_after)
            self.metrics.print(f"test with the {'best' if best_tag else 'final'} model: {describe(test_after)}")
            # test_before is None when the run was started without data.test_split and it was added on resume.
            results.update(test_before=self.test_before, test_after=test_after,
                           test_gain={k: test_after[k] - self.test_before[k] for k in test_after}
                           if self.test_before else None)
        if self.rank == 0:
            write_atomic(self.cfg.run_dir / layout.RESULTS, json.dumps(results, indent=2))
        return results

    def state_dict(self) -> dict:
        return {"best": self.best.state_dict() if self.best else None, "test_before": self.test_before}

    def load_state_dict(self, state: dict) -> None:
        self.test_before = state["test_before"]
        if self.best and state["best"]:
            self.best.load_state_dict(state["best"])
