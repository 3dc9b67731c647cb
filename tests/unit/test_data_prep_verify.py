"""data_prep.verify: a shard directory re-checked against its manifest names every missing, truncated or modified
file (and the reader refuses a truncated shard)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import ShardSet
from data_prep.verify import verify_shards


def test_verify_reports_missing_truncated_and_modified_files(tiny, tmp_path):
    out = tmp_path / "out"
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, shard_tokens=300)
    assert verify_shards(out)[0] == []
    (out / "train_00000.idx.npy").unlink()
    (out / "train_00001.bin").write_bytes((out / "train_00001.bin").read_bytes()[:-2])
    index = np.load(out / "train_00002.idx.npy")
    np.save(out / "train_00002.idx.npy", index[::-1].copy())
    size = ShardSet(out).shard_num_tokens[1] * 2
    assert verify_shards(out)[0] == [
        f"{out / 'train_00000.idx.npy'}: missing",
        f"{out / 'train_00001.bin'}: {size - 2} bytes, manifest says {size}",
        f"{out / 'train_00002.idx.npy'}: sha256 differs from the manifest (file changed or corrupt)"]
    with pytest.raises(DataError, match=r"train_00001\.bin: \d+ bytes but manifest\.json says \d+"):
        ShardSet(out).tokens(1)
