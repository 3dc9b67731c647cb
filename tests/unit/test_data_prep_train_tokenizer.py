"""data_prep.train_tokenizer: the byte-level BPE directory it writes loads with transformers and gives the ids of
`tokenizers`; a re-run replaces it atomically but never a foreign directory; a bad record names its file and line."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from data_prep.errors import DataError
from data_prep.train_tokenizer import train_tokenizer
from tests.conftest import reference_ids


def test_hf_tokenizer_dir_loads_with_transformers_and_gives_same_ids(tiny):
    from transformers import AutoTokenizer  # only the test needs transformers; data_prep never imports it

    hf = AutoTokenizer.from_pretrained(str(tiny["tokenizer"]))
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (0, 0, 1)
    assert hf.model_max_length == 2048
    assert len(hf) == tiny["hf"].get_vocab_size(with_added_tokens=True) <= 400  # a tiny corpus has < 400 merges
    for text, ids in zip(tiny["docs"][:20], reference_ids(tiny["hf"], tiny["docs"][:20])):
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text  # byte-level: lossless


def test_tokenizer_dir_is_replaced_atomically_but_never_a_foreign_dir(tiny, tmp_path):
    out = tmp_path / "tok"
    train_tokenizer([str(tiny["jsonl"])], out, vocab_size=300)
    train_tokenizer([str(tiny["jsonl"])], out, vocab_size=350)  # re-run replaces it
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 350
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    (out / "README.md").write_text("mine")
    with pytest.raises(DataError, match=r"holds files other than a tokenizer's \(README\.md\)"):
        train_tokenizer([str(tiny["jsonl"])], out, vocab_size=300)
    assert (out / "README.md").read_text() == "mine"


def test_tokenizer_training_reports_bad_records(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: record has no field 'text'"):
        train_tokenizer([str(path)], tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()
