"""Training on a blend spec: items come from each part in proportion to its weight, and are that part's items."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.blend import BlendSampler, load_blend
from train.data import BlendedItems, GlobalBatchSampler, TokenWindows


def test_blended_items_are_the_parts_items_in_proportion(blend_spec):
    sets, weights = load_blend(blend_spec, "train")
    parts = [TokenWindows(s, 32) for s in sets]
    items = BlendedItems(parts, BlendSampler(sets, weights, 32, seed=7))
    assert len(items) == len(parts[0]) + len(parts[1])
    order = GlobalBatchSampler(len(items), 8, 1, 1, 0, seed=7)
    from_part = np.zeros(2)
    for _ in range(200):
        (indices,) = order.next_step()
        batch, tokens = items.model_batch(indices)
        assert tokens == 8 * 32 and batch["input_ids"].shape == (8, 32)
        for row, (part, item) in zip(batch["input_ids"], items._locate(indices)):
            assert row.tolist() == parts[part].batch(np.array([item]))[0].tolist()
            from_part[part] += 1
    assert from_part[0] / from_part.sum() == pytest.approx(0.75, abs=0.03)
    assert items.realised() == pytest.approx([0.75, 0.25], abs=0.02)
