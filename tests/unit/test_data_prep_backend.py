"""data_prep.backend: the ids of `tokenizers` for a tokenizer directory as users bring it, whichever backend encodes
them: gigatoken where it agrees on a sample (else the fallback, saying why), a tokenizer.json's own padding and
truncation ignored, an encoder without eos (its sep token, or the one --eos-token names, separates documents),
slow-format directories converted,
and one error line for a directory that cannot be loaded."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.backend import TokenizerBackend, load_tokenizer, require_eos, special_token_ids
from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import ShardSet
from data_prep.train_tokenizer import train_tokenizer
from tests.conftest import reference_ids

WORDS = "alpha beta gamma delta token shard rank step loss falls rises model data reads writes".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("backend")
    rng = random.Random(0)
    # Lengths from 2 to 400 words: both sides of a 16-token padding/truncation setting.
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 5, 40, 400)))) for _ in range(60)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer([str(root / "corpus.jsonl")], root / "tokenizer", vocab_size=300)
    return {"root": root, "docs": docs, "tokenizer": root / "tokenizer",
            "reference": Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))}


def split_ids(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(lengths)
    return [flat[e - n:e].tolist() for e, n in zip(ends, lengths)]


def test_gigatoken_and_tokenizers_backends_write_identical_shards(tiny, tmp_path):
    manifests = {}
    for backend in ("gigatoken", "tokenizers"):
        manifests[backend] = tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], tmp_path / backend,
                                             val_fraction=0.2, shard_tokens=500, backend=backend)
        assert manifests[backend]["tokenizer"]["backend"] == backend
    assert manifests["gigatoken"]["splits"] == manifests["tokenizers"]["splits"]  # incl. every sha256
    assert len(manifests["gigatoken"]["splits"]["train"]["shards"]) > 1


def test_backend_falls_back_to_tokenizers_when_gigatoken_ids_differ(tiny, monkeypatch):
    real = TokenizerBackend._encode_gigatoken

    def off_by_one(giga, texts):
        flat, lengths = real(giga, texts)
        flat[-1] += 1  # corrupt the last id of the last sample document
        return flat, lengths

    monkeypatch.setattr(TokenizerBackend, "_encode_gigatoken", staticmethod(off_by_one))
    backend = TokenizerBackend(tiny["tokenizer"], tiny["docs"][:5])
    assert backend.name == "tokenizers"
    assert backend.reason == "gigatoken ids differ from tokenizers on document 4 of 5 sample documents"
    with pytest.raises(DataError, match="DATA_PREP_BACKEND=gigatoken but gigatoken cannot be used"):
        TokenizerBackend(tiny["tokenizer"], tiny["docs"][:5], backend="gigatoken")


def test_padding_and_truncation_in_tokenizer_json_are_ignored(corpus, tmp_path):
    directory = tmp_path / "finetuned"
    shutil.copytree(corpus["tokenizer"], directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_padding(length=16, pad_id=0, pad_token="<|endoftext|>")
    tokenizer.enable_truncation(max_length=16)
    tokenizer.save(str(directory / "tokenizer.json"))
    saved = json.loads((directory / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"]["max_length"] == 16  # as a fine-tuned model's

    expected = reference_ids(corpus["reference"], corpus["docs"])
    assert max(map(len, expected)) > 16 and min(map(len, expected)) < 16
    for backend in ("tokenizers", "gigatoken"):
        encoder = TokenizerBackend(directory, corpus["docs"][:10], backend=backend)
        assert split_ids(*encoder.encode_batch(corpus["docs"])) == expected, backend

    tokenize_corpus([str(corpus["root"] / "corpus.jsonl")], directory, tmp_path / "shards")
    shards = ShardSet(tmp_path / "shards")
    eos = corpus["reference"].token_to_id("<|endoftext|>")
    stored = np.concatenate([np.asarray(shards.tokens(i)) for i in range(len(shards))]).tolist()
    assert stored == [i for ids in expected for i in [*ids, eos]]  # eos per document, nothing cut or padded


def wordpiece_dir(directory, config: dict):
    """A BERT-style WordPiece tokenizer directory: [PAD] [UNK] [CLS] [SEP], the corpus words, no eos token."""
    from tokenizers import models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


def test_an_encoder_without_eos_separates_documents_with_its_sep_token_or_the_named_one(tmp_path):
    tokenizer = wordpiece_dir(tmp_path / "bert", {"sep_token": "[SEP]", "cls_token": "[CLS]", "pad_token": "[PAD]"})
    assert special_token_ids(tmp_path / "bert", tokenizer) == {"eos_id": 3, "bos_id": None, "pad_id": 0}
    assert special_token_ids(tmp_path / "bert", tokenizer, eos_token="[CLS]")["eos_id"] == 2  # --eos-token wins

    tokenizer = wordpiece_dir(tmp_path / "none", {"cls_token": "[CLS]"})
    ids = special_token_ids(tmp_path / "none", tokenizer)
    assert ids["eos_id"] is None
    with pytest.raises(DataError) as err:
        require_eos(tmp_path / "none", ids)
    assert str(err.value) == (f"{tmp_path / 'none'}: the tokenizer has no eos_token or sep_token (one is needed "
                              "between documents); name one of its special tokens with --eos-token, or set "
                              "eos_token in its tokenizer_config.json")
    assert require_eos(tmp_path / "none", special_token_ids(tmp_path / "none", tokenizer, eos_token="[CLS]")) == 2
    with pytest.raises(DataError) as err:
        special_token_ids(tmp_path / "none", tokenizer, eos_token="</s>")
    assert str(err.value) == (f"--eos-token '</s>' is not in the vocabulary of {tmp_path / 'none'}; name one of its "
                              "special tokens")


def test_tokenize_with_eos_token_separates_documents_with_it(tmp_path):
    tokenizer = wordpiece_dir(tmp_path / "none", {"cls_token": "[CLS]"})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("alpha beta", "gamma delta delta")))
    with pytest.raises(DataError, match="name one of its special tokens with --eos-token"):
        tokenize_corpus([str(corpus)], tmp_path / "none", tmp_path / "refused")
    manifest = tokenize_corpus([str(corpus)], tmp_path / "none", tmp_path / "shards", eos_token="[CLS]")
    eos = tokenizer.token_to_id("[CLS]")
    assert manifest["tokenizer"]["eos_id"] == eos and manifest["framing"]["eos"] == eos
    assert ShardSet(tmp_path / "shards", "train").tokens(0).tolist() == [4, 5, eos, 6, 7, 7, eos]


def test_a_slow_format_directory_is_converted_to_the_same_ids(corpus, tmp_path):
    directory = tmp_path / "gpt2_style"
    directory.mkdir()
    corpus["reference"].model.save(str(directory))  # vocab.json + merges.txt, no tokenizer.json
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 1024}))
    assert sorted(p.name for p in directory.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    encoder = TokenizerBackend(directory, corpus["docs"][:10], backend="tokenizers")
    assert split_ids(*encoder.encode_batch(corpus["docs"])) == reference_ids(corpus["reference"], corpus["docs"])
    assert encoder.special_ids["eos_id"] == corpus["reference"].token_to_id("<|endoftext|>")


def test_a_directory_transformers_cannot_load_is_one_line_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        load_tokenizer(empty)
    assert str(err.value).startswith(f"{empty}: no tokenizer.json and no slow-format tokenizer files (vocab.json, ")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{}")  # merges.txt and any config missing
    with pytest.raises(DataError) as err:
        load_tokenizer(broken)
    message = str(err.value)
    assert message.startswith(f"{broken}: transformers cannot load this tokenizer from vocab.json (")
    assert "\n" not in message
