"""train.best: best-checkpoint tracking and early stopping on one validation metric, and its state across a
resume."""

from __future__ import annotations

from train.best import BestTracker


def test_early_stopping_stops_after_patience_evals_without_a_new_best():
    curve = [0.60, 0.70, 0.72, 0.71, 0.72, 0.69, 0.80]  # accuracy per epoch
    tracker = BestTracker("val/accuracy", "max", patience=3)
    new_best, stopped_at = [], None
    for epoch, value in enumerate(curve, start=1):
        new_best.append(tracker.update(epoch, value))
        if tracker.should_stop:
            stopped_at = epoch
            break
    assert new_best == [True, True, True, False, False, False]  # 0.72 again is not better
    assert stopped_at == 6 and tracker.best_step == 3 and tracker.best_value == 0.72
    restored = BestTracker("val/accuracy", "max", patience=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.should_stop and restored.best_step == 3
    low = BestTracker("val/loss", "min", patience=0)
    assert [low.update(s, v) for s, v in enumerate([3.0, float("nan"), 2.5, 2.9])] == [True, False, True, False]
    assert not low.should_stop  # patience 0 never stops
