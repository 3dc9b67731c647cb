"""Train/val assignment by document ordinal: deterministic, and independent of batch size or file boundaries.

Document n (0-based, counting the non-empty documents in reading order) goes to val iff splitmix64(n) / 2**64 <
val_fraction (using the top 53 bits, exact in float64). Document 0 always goes to val when val_fraction > 0, so a
small corpus cannot end up with an empty validation split by chance.
"""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (Steele et al.) as a hash: the first output of the generator seeded with x, vectorized.
    uint64 arithmetic wraps mod 2**64, as the algorithm intends."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_mask(first_ordinal: int, count: int, val_fraction: float) -> np.ndarray:
    """Boolean mask over documents first_ordinal .. first_ordinal+count-1: True = validation."""
    if val_fraction <= 0:
        return np.zeros(count, dtype=bool)
    ordinals = np.arange(first_ordinal, first_ordinal + count, dtype=np.uint64)
    uniform = (splitmix64(ordinals) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (uniform < val_fraction) | (ordinals == 0)
