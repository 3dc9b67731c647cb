"""train.schedule: the learning rate at each step (linear warmup, then cosine to min_lr; constant past max_steps)."""

from __future__ import annotations

import math

import pytest

from train.config import OptimConfig
from train.schedule import lr_at


def test_lr_warmup_then_cosine_to_min():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(10, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway through the cosine
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    assert lr_at(500, optim, 110) == pytest.approx(0.1)  # stays at min_lr past max_steps
    values = [lr_at(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_without_warmup_starts_at_peak():
    optim = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, optim, 100) == 2.0
    assert lr_at(25, optim, 100) == pytest.approx(1.0 + math.cos(math.pi / 4))
