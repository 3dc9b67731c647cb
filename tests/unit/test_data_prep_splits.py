"""data_prep.splits: train / val / test by document ordinal (the documented splitmix64 rule, exact counts),
deterministic whatever the batch size, and the errors for splits that cannot be made."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import ShardSet
from data_prep.splits import SplitSpec, splitmix64
from tests.conftest import docs_of, reference_ids


def test_val_split_is_deterministic_and_independent_of_batch_size(tiny, tmp_path):
    runs = [tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], tmp_path / f"b{bs}", val_fraction=0.25,
                            batch_size=bs, shard_tokens=1000) for bs in (1, 7, 1024)]
    assert runs[0]["splits"] == runs[1]["splits"] == runs[2]["splits"]
    spec = SplitSpec(val_fraction=0.25)
    mask = spec.assign(0, 120, spec.thresholds(120)) == 1
    assert mask[0] and runs[0]["splits"]["val"]["num_docs"] == int(mask.sum()) == 25  # pinned: the hash is fixed
    ids = reference_ids(tiny["hf"], tiny["docs"][:120])
    assert docs_of(ShardSet(tmp_path / "b7", "val")) == [ids[n] + [0] for n in np.flatnonzero(mask)]
    assert docs_of(ShardSet(tmp_path / "b7", "train")) == [ids[n] + [0] for n in np.flatnonzero(~mask)]


def test_split_hash_is_splitmix64():
    # hash(n) = the first output of the splitmix64 generator seeded with n (published reference values).
    assert [hex(int(h)) for h in splitmix64(np.arange(2, dtype=np.uint64))] == [
        "0xe220a8397b1dcdaf", "0x910a2dec89025cc1"]
    spec = SplitSpec(val_fraction=0.02)
    assert abs(np.mean(spec.assign(0, 100_000, spec.thresholds(100_000)) == 1) - 0.02) < 0.002


def test_val_fraction_needs_two_documents(tiny, tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "alone"}\n')
    with pytest.raises(DataError, match="needs at least 2 documents, the inputs hold 1"):
        tokenize_corpus([str(tmp_path / "one.jsonl")], tiny["tokenizer"], tmp_path / "out", val_fraction=0.1)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_split_fraction_rule_is_the_documented_one_and_counts_are_exact():
    # By fraction: document n goes to val iff the top 53 bits of splitmix64(n) / 2**53 < val_fraction; document 0
    # always does.
    spec = SplitSpec(val_fraction=0.05)
    ordinals = np.arange(100_000, dtype=np.uint64)
    uniform = (splitmix64(ordinals) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    assert np.array_equal(spec.assign(0, 100_000, spec.thresholds(100_000)) == 1, (uniform < 0.05) | (ordinals == 0))
    spec = SplitSpec(val_count=137, test_fraction=0.02)
    a = spec.assign(0, 50_000, spec.thresholds(50_000))
    assert np.count_nonzero(a == 1) == 137 and abs(np.count_nonzero(a == 2) / 50_000 - 0.02) < 0.003
    spec = SplitSpec(val_fraction=0.01, test_count=1_000)
    n = 3 * (1 << 20) + 5  # spans several selection chunks
    t = spec.thresholds(n)
    counts = np.bincount(np.concatenate([spec.assign(s, min(1 << 20, n - s), t) for s in range(0, n, 1 << 20)]))
    assert counts[2] == 1_000
    # assignment depends on the ordinal only: a slice assigned alone equals the slice of the whole
    assert np.array_equal(spec.assign(12_345, 100, t), spec.assign(0, 20_000, t)[12_345:12_445])


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=0.1, val_count=3), "give --val-fraction or --val-count, not both"),
    (dict(test_fraction=1.0), "--test-fraction 1.0 must be in [0, 1)"),
    (dict(val_fraction=0.6, test_fraction=0.5), "--val-fraction + --test-fraction = 1.1 must be < 1"),
    (dict(val_count=-1), "--val-count -1 must be >= 0"),
])
def test_split_spec_errors(kwargs, message):
    with pytest.raises(DataError) as info:
        SplitSpec(**kwargs)
    assert str(info.value) == message


def test_counts_larger_than_corpus_and_empty_test_split(tiny, tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "c.jsonl")], tiny["tokenizer"], tmp_path / "o1", val_count=6, test_count=4)
    assert str(info.value) == "--val-count 6 + --test-count 4 leave no training documents: the inputs hold 10"
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "c.jsonl")], tiny["tokenizer"], tmp_path / "o2", test_fraction=0.001)
    assert str(info.value) == ("--test-fraction 0.001 left the test split empty (10 documents); raise it or use "
                               "--test-count")
