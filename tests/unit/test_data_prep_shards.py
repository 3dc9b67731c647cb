"""data_prep.shards: the shard format training reads (uint16 up to 65,535 ids, else uint32; no document straddles two
shards; every document ends with eos), its writer (rollover at the threshold, abort) and its memmapped reader's
errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import ShardSet, ShardWriter, dtype_for_vocab, load_manifest
from data_prep.train_tokenizer import save_tokenizer_dir
from tests.conftest import docs_of, reference_ids


def test_dtype_is_uint16_up_to_65535_ids_else_uint32():
    assert dtype_for_vocab(400) == np.uint16 and dtype_for_vocab(65535) == np.uint16
    assert dtype_for_vocab(65536) == np.uint32 and dtype_for_vocab(200_000) == np.uint32


def test_large_vocab_writes_uint32_and_keeps_ids_above_65535(tmp_path):
    # 70,000 tokens, with the 256 byte symbols placed at ids >= 69,744 so uint16 would corrupt every one of them.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    vocab.update({f"filler{i}": i for i in range(2, 70_000 - len(alphabet))})
    vocab.update({symbol: 70_000 - len(alphabet) + i for i, symbol in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    save_tokenizer_dir(tokenizer, tmp_path / "tok", model_max_length=64)
    (tmp_path / "c.jsonl").write_text('{"text": "hi there"}\n{"text": "ok"}\n')
    manifest = tokenize_corpus([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out")
    shards = ShardSet(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and shards.dtype == np.dtype("<u4")
    assert manifest["tokenizer"]["vocab_size"] == 70_000
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 4 * shards.num_tokens
    expected = [ids + [0] for ids in reference_ids(tokenizer, ["hi there", "ok"])]
    assert min(expected[0][:-1]) >= 69_744 and docs_of(shards) == expected


def test_shard_rollover_no_document_straddles(tiny, tmp_path):
    shard_tokens = 300
    manifest = tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], tmp_path / "out", shard_tokens=shard_tokens,
                               batch_size=16)
    shards = ShardSet(tmp_path / "out")
    entries = manifest["splits"]["train"]["shards"]
    assert shards.num_shards == len(entries) >= 4
    assert [e["file"] for e in entries] == [f"train_{k:05d}.bin" for k in range(len(entries))]
    for i, entry in enumerate(entries):
        offsets = shards.doc_offsets(i)
        tokens = shards.tokens(i)
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens) == entry["num_tokens"]
        assert len(offsets) == entry["num_docs"] + 1
        assert np.all(tokens[offsets[1:] - 1] == 0)  # every document ends with eos, inside this shard
        assert np.count_nonzero(tokens == 0) == entry["num_docs"]  # and eos appears nowhere else
        if i < len(entries) - 1:  # full shards: reached shard_tokens with their last document, not before
            assert entry["num_tokens"] >= shard_tokens and offsets[-2] < shard_tokens
    assert shards.shard_num_tokens == [e["num_tokens"] for e in entries]
    assert shards.num_tokens == sum(shards.shard_num_tokens) == manifest["splits"]["train"]["num_tokens"]
    assert sum(e["num_docs"] for e in entries) == manifest["splits"]["train"]["num_docs"] == 120
    expected = [ids + [0] for ids in reference_ids(tiny["hf"], tiny["docs"][:120])]
    assert docs_of(shards) == expected


def test_shard_writer_splits_batches_at_the_threshold(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=5)
    writer.add(np.arange(1, 10, dtype=np.uint32), np.array([2, 2, 3, 2]))  # docs end at 2, 4, 7, 9
    writer.add(np.array([7], dtype=np.uint32), np.array([1]))
    entries = writer.close()
    assert [(e["num_tokens"], e["num_docs"]) for e in entries] == [(7, 3), (3, 2)]
    assert np.fromfile(tmp_path / "train_00000.bin", dtype="<u2").tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert np.load(tmp_path / "train_00001.idx.npy").tolist() == [0, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin", "train_00000.idx.npy",
                                                         "train_00001.bin", "train_00001.idx.npy"]


def test_shard_writer_abort_drops_the_shard_in_progress_and_its_temporaries(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=5, with_mask=True)
    writer.add(np.arange(1, 8, dtype=np.uint32), np.array([3, 4]), np.ones(7, dtype=np.uint8))  # shard 0: complete
    writer.add(np.array([1, 2], dtype=np.uint32), np.array([2]), np.ones(2, dtype=np.uint8))  # shard 1: open
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin", "train_00000.idx.npy",
                                                         "train_00000.mask.bin"]


def test_shardset_errors_name_directory_split_and_file(tiny, tmp_path):
    out = tmp_path / "out"
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out)
    with pytest.raises(DataError) as info:
        ShardSet(out, "val")
    assert str(info.value) == f"{out}: no split 'val' in manifest.json; splits available: train"
    with pytest.raises(DataError, match=r"manifest\.json: not found"):
        load_manifest(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(DataError, match=r"manifest\.json: unknown format_version 2 \(this code reads 1\)"):
        ShardSet(out)
