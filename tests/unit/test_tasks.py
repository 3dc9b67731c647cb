"""train.tasks: the loss of each task and the evaluation sums (classification accuracy, macro F1 and loss; the
token-weighted LM loss), checked against hand counts."""

from __future__ import annotations

import pytest
import torch

from train import tasks
from train.data import IGNORE


def test_classification_metrics_match_a_hand_count():
    # true labels and predictions over 3 classes
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    pred = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    logits = torch.full((10, 3), -5.0)
    logits[torch.arange(10), torch.tensor(pred)] = 5.0
    sums = tasks.EvalSums("classification", 3, "cpu")
    sums.add(logits[:6], torch.tensor(true[:6]))
    sums.add(logits[6:], torch.tensor(true[6:]))
    sums.add(logits[:2], torch.tensor([IGNORE, IGNORE]))  # placeholder rows count nothing
    metrics = sums.metrics()
    # class 0: tp 3, fp 1, fn 1 -> f1 6/8; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 3, fp 1, fn 1 -> 6/8
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(true)).item()
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_lm_eval_loss_is_token_weighted_and_ignores_masked_positions():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[3, 1, IGNORE, 2, 4], [IGNORE, IGNORE, IGNORE, IGNORE, 6]])
    sums = tasks.EvalSums("sft", 0, "cpu")
    sums.add(logits, labels)
    pairs = [(0, 0, 1), (0, 2, 3), (0, 3, 4), (1, 3, 4)]  # (row, predicting position, label position)
    by_hand = [torch.nn.functional.cross_entropy(logits[r, p], labels[r, t]).item() for r, p, t in pairs]
    assert sums.metrics()["loss"] == pytest.approx(sum(by_hand) / 4)
    assert tasks.loss("sft", logits, labels).item() == pytest.approx(sum(by_hand) / 4)
