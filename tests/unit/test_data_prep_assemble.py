"""data_prep.assemble: what an output directory may hold: a re-run replaces the shards of an earlier one and
refuses a directory holding anything else."""

from __future__ import annotations

import pytest

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus


def test_rerun_replaces_old_shards_and_refuses_foreign_files(tiny, tmp_path):
    out = tmp_path / "out"
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, shard_tokens=300)
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out)  # one shard now: the old ones must be gone
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.bin", "train_00000.idx.npy"]
    (out / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="holds files that are not shards"):
        tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out)
