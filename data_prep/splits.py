"""Train / val / test assignment by document ordinal: deterministic, and independent of batch size, workers, chunks
or file boundaries.

Document n (0-based, counting the non-empty documents in reading order) has the hash h = splitmix64(n), a bijection
on uint64, so no two documents tie. It goes to val iff h < A, to test iff A <= h < B, else to train. By fraction,
A = ceil(val_fraction * 2**53) << 11, so that a document goes to val iff the top 53 bits of its hash / 2**53 <
val_fraction (exact in float64), and B = A + ceil(test_fraction * 2**53) << 11. By count, A is one more than the
val_count-th smallest hash (so exactly val_count documents fall below it) and B one more than the test_count-th
smallest hash >= A. With val by fraction, document 0 always goes to val, so that a small corpus cannot end up with
an empty validation split by chance. Everything depends on the document ordinal (and, for counts, on the total
number of documents) alone.
"""

from __future__ import annotations

import numpy as np

from data_prep.errors import DataError

SPLITS = ("train", "val", "test")  # our splits, by their code: SplitSpec.assign's 0, 1, 2
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
SPLIT_CHUNK = 1 << 20


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (Steele et al.) as a hash: the first output of the generator seeded with x, vectorized.
    uint64 arithmetic wraps mod 2**64, as the algorithm intends."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SplitSpec:
    """Which documents go to val and test: by fraction or by count (module docstring), or by the split of the input
    they come from (`from_input`)."""

    def __init__(self, val_fraction: float = 0.0, val_count: int = 0, test_fraction: float = 0.0,
                 test_count: int = 0, from_input: bool = False):
        if from_input and (val_fraction or val_count or test_fraction or test_count):
            raise DataError("--splits-from-input takes val and test from the dataset's own splits; drop --val-fraction"
                            ", --val-count, --test-fraction and --test-count")
        # from_input: documents keep the split of the hf: dataset split they come from (train / validation / test ->
        # train / val / test, see data_prep.hf_datasets); tokenize plans each split's units apart and records
        # every unit's split, so no hash is involved.
        self.from_input = bool(from_input)

        for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name} {value} must be in [0, 1)")
        for name, value in (("--val-count", val_count), ("--test-count", test_count)):
            if value < 0:
                raise DataError(f"{name} {value} must be >= 0")
        if val_fraction and val_count:
            raise DataError("give --val-fraction or --val-count, not both")
        if test_fraction and test_count:
            raise DataError("give --test-fraction or --test-count, not both")
        if val_fraction + test_fraction >= 1.0:
            raise DataError(f"--val-fraction + --test-fraction = {val_fraction + test_fraction} must be < 1")
        self.val_fraction, self.val_count = float(val_fraction), int(val_count)
        self.test_fraction, self.test_count = float(test_fraction), int(test_count)

    def as_dict(self) -> dict:
        d = {"val_fraction": self.val_fraction, "val_count": self.val_count,
             "test_fraction": self.test_fraction, "test_count": self.test_count}
        if self.from_input:  # only then, so that the keys of runs without it stay what they were
            d["from_input"] = True
        return d

    def split_names(self) -> list[str]:
        names = ["train"]
        if self.val_fraction or self.val_count:
            names.append("val")
        if self.test_fraction or self.test_count:
            names.append("test")
        return names

    @staticmethod
    def _kth_smallest_at_least(num_docs: int, k: int, low: int) -> int:
        """The k-th smallest hash >= low among documents 0..num_docs-1 (streamed in chunks: O(k + chunk) memory)."""
        best = np.empty(0, dtype=np.uint64)
        for first in range(0, num_docs, SPLIT_CHUNK):
            h = splitmix64(np.arange(first, min(first + SPLIT_CHUNK, num_docs), dtype=np.uint64))
            h = np.concatenate([best, h[h >= np.uint64(low)]])
            best = np.partition(h, k - 1)[:k] if len(h) > k else h
        return int(np.sort(best)[k - 1])

    def thresholds(self, num_docs: int) -> tuple[int, int]:
        """(A, B) for a corpus of num_docs documents (module docstring); DataError if a count cannot be met."""
        if self.val_count + self.test_count >= num_docs and (self.val_count or self.test_count):
            raise DataError(f"--val-count {self.val_count} + --test-count {self.test_count} leave no training "
                            f"documents: the inputs hold {num_docs}")
        if self.val_count:
            a = self._kth_smallest_at_least(num_docs, self.val_count, 0) + 1
        else:
            a = int(np.ceil(self.val_fraction * 2.0**53)) << 11
        if self.test_count:
            b = self._kth_smallest_at_least(num_docs, self.test_count, a) + 1
        else:
            b = a + (int(np.ceil(self.test_fraction * 2.0**53)) << 11)
        return a, b

    def assign(self, first_ordinal: int, count: int, thresholds: tuple[int, int]) -> np.ndarray:
        """uint8 per document: 0 train, 1 val, 2 test."""
        a, b = thresholds
        ordinals = np.arange(first_ordinal, first_ordinal + count, dtype=np.uint64)
        h = splitmix64(ordinals)
        out = np.zeros(count, dtype=np.uint8)
        if a:
            out[h < np.uint64(min(a, 2**64 - 1))] = 1
        if b > a:
            out[(h >= np.uint64(min(a, 2**64 - 1))) & (h < np.uint64(min(b, 2**64 - 1)))] = 2
        if self.val_fraction > 0:
            out[ordinals == 0] = 1
        return out
