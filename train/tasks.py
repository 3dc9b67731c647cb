"""What each task computes from the model's logits: the training loss and the validation/test metrics.

The model is always called without labels and the loss is computed here, so one code path serves training,
evaluation and every task: causal_lm and sft predict token t+1 from positions <= t (labels -100 carry no loss);
classification has one label per row. Evaluation accumulates sums (`EvalSums`) that are all-reduced once, so the
metrics are exact over the whole evaluated split whatever the world size: token-weighted loss for LM tasks, and a
confusion matrix for classification.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.data import IGNORE


def _lm_logits_and_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss of a micro-batch: over its trained tokens (LM tasks) or its rows (classification)."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, label_smoothing=label_smoothing)
    flat_logits, targets = _lm_logits_and_targets(logits, labels)
    return F.cross_entropy(flat_logits, targets, ignore_index=IGNORE)


class EvalSums:
    """Running sums of one evaluation pass on this rank: [loss sum, count] and, for classification, the
    confusion matrix (rows = true label, columns = prediction)."""

    def __init__(self, kind: str, num_labels: int, device):
        self.kind = kind
        self.num_labels = num_labels
        size = 2 + (num_labels * num_labels if kind == "classification" else 0)
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.kind == "classification":
            valid = labels != IGNORE
            logits, labels = logits[valid].float(), labels[valid]
            self.sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            self.sums[1] += len(labels)
            cells = labels * self.num_labels + logits.argmax(-1)
            self.sums[2:] += torch.bincount(cells, minlength=self.num_labels ** 2).double()
        else:
            flat_logits, targets = _lm_logits_and_targets(logits, labels)
            self.sums[0] += F.cross_entropy(flat_logits, targets, ignore_index=IGNORE, reduction="sum").double()
            self.sums[1] += (targets != IGNORE).sum()

    def metrics(self) -> dict[str, float]:
        """Metrics from the (all-reduced) sums, without the split prefix."""
        total, count = self.sums[0].item(), self.sums[1].item()
        if count == 0:
            return {}
        mean = total / count
        if self.kind != "classification":
            return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
        return {"loss": mean, **classification_metrics(self.sums[2:].view(self.num_labels, self.num_labels))}


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows = true, columns = predicted). Macro-F1 averages the
    per-class F1 = 2TP / (2TP + FP + FN) over classes that occur as a label or a prediction (as scikit-learn does)."""
    confusion = confusion.double()
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return {"accuracy": (tp.sum() / confusion.sum()).item(), "macro_f1": f1[present].mean().item()}
