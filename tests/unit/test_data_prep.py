"""data_prep: readers, tokenizer training, the shard format and manifest, split assignment, verify and the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from data_prep.errors import DataError
from data_prep.manifest import tokenizer_fingerprint
from data_prep.pipeline import tokenize_corpus
from data_prep.pieces import ReadStats
from data_prep.readers import expand_inputs
from data_prep.records import iter_documents
from data_prep.shards import ShardSet, ShardWriter, dtype_for_vocab, load_manifest
from data_prep.splits import SplitSpec, splitmix64
from data_prep.train_tokenizer import save_tokenizer_dir, train_tokenizer
from data_prep.verify import verify_shards

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("alpha beta gamma delta token shard rank step loss falls rises model data reads writes quick slow "
         "café naïve 日本語 über {} [] () = + def return class").split()


def random_text(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A jsonl corpus (120 docs), 3 .txt documents and a 400-token byte-level BPE trained on them."""
    root = tmp_path_factory.mktemp("data_prep")
    rng = random.Random(0)
    jsonl_docs = [random_text(rng) for _ in range(120)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                               for i, t in enumerate(jsonl_docs)), encoding="utf-8")
    (root / "txt").mkdir()
    txt_docs = [random_text(rng) + "\n" for _ in range(3)]
    for i, text in enumerate(txt_docs):
        (root / "txt" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tokenizer_dir = root / "tokenizer"
    train_tokenizer([str(root / "corpus.jsonl")], tokenizer_dir, vocab_size=400)
    return {"root": root, "jsonl": root / "corpus.jsonl", "txt_dir": root / "txt", "docs": jsonl_docs + txt_docs,
            "tokenizer": tokenizer_dir, "hf": Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))}


def reference_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def docs_of(shards: ShardSet) -> list[list[int]]:
    """Every document of the split, in order, as a list of ids (eos included)."""
    out = []
    for i in range(shards.num_shards):
        tokens, offsets = shards.tokens(i), shards.doc_offsets(i)
        out += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_jsonl_and_txt_equals_tokenizers_plus_eos(tiny, tmp_path):
    out = tmp_path / "shards"
    manifest = tokenize_corpus([str(tiny["jsonl"]), str(tiny["txt_dir"])], tiny["tokenizer"], out)
    shards = ShardSet(out)
    eos = manifest["tokenizer"]["eos_id"]
    assert eos == tiny["hf"].token_to_id("<|endoftext|>") == 0
    expected = [ids + [eos] for ids in reference_ids(tiny["hf"], tiny["docs"])]
    assert docs_of(shards) == expected
    assert shards.num_tokens == sum(map(len, expected)) == manifest["splits"]["train"]["num_tokens"]
    assert manifest["splits"]["train"]["num_docs"] == 123
    assert manifest["inputs"] == [str(tiny["jsonl"])] + [str(tiny["txt_dir"] / f"doc{i}.txt") for i in range(3)]
    tokens = shards.tokens(0)
    assert isinstance(tokens, np.memmap) and tokens.ndim == 1 and not tokens.flags.writeable
    assert shards.tokens(0) is tokens  # cached


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


def test_gigatoken_and_tokenizers_backends_write_identical_shards(tiny, tmp_path):
    manifests = {}
    for backend in ("gigatoken", "tokenizers"):
        manifests[backend] = tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], tmp_path / backend,
                                             val_fraction=0.2, shard_tokens=500, backend=backend)
        assert manifests[backend]["tokenizer"]["backend"] == backend
    assert manifests["gigatoken"]["splits"] == manifests["tokenizers"]["splits"]  # incl. every sha256
    assert len(manifests["gigatoken"]["splits"]["train"]["shards"]) > 1


def test_backend_falls_back_to_tokenizers_when_gigatoken_ids_differ(tiny, monkeypatch):
    from data_prep.backend import TokenizerBackend

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


# ---------------------------------------------------------------------------------------------- shard format


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


# ---------------------------------------------------------------------------------------------- splits + manifest


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


def test_manifest_fields_and_checksums(tiny, tmp_path):
    out = tmp_path / "out"
    manifest = tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, val_fraction=0.1, shard_tokens=800)
    assert manifest == json.loads((out / "manifest.json").read_text()) == load_manifest(out)
    assert set(manifest) == {"format_version", "record_kind", "tokenizer", "dtype", "splits", "inputs",
                             "val_fraction", "counts", "prep", "framing"}
    # Our byte-level BPE's post-processor adds no special tokens: eos after every document, nothing else.
    assert manifest["framing"] == {"eos": 0, "single": [[], []], "pair": [[], [], []],
                                   "pair_types": [[], 0, [], 0, []]}
    assert (manifest["format_version"], manifest["record_kind"], manifest["dtype"]) == (1, "text", "uint16")
    tok = manifest["tokenizer"]
    assert tok == {"path": str(tiny["tokenizer"].resolve()), "fingerprint": tokenizer_fingerprint(tiny["tokenizer"]),
                   "vocab_size": tiny["hf"].get_vocab_size(with_added_tokens=True), "eos_id": 0, "bos_id": 0,
                   "pad_id": 1, "backend": "gigatoken", "chat_template_sha256": None}
    assert manifest["val_fraction"] == 0.1 and manifest["inputs"] == [str(tiny["jsonl"])]
    assert manifest["counts"] == {"docs_read": 120, "docs_empty_dropped": 0,
                                  "bytes_read": tiny["jsonl"].stat().st_size, "bad_records": {}}
    assert manifest["prep"]["splits"] == {"val_fraction": 0.1, "val_count": 0, "test_fraction": 0.0, "test_count": 0}
    assert manifest["prep"]["shard_tokens"] == 800 and len(manifest["prep"]["key"]) == 64
    for split, info in manifest["splits"].items():
        assert info["num_tokens"] == sum(s["num_tokens"] for s in info["shards"])
        for shard in info["shards"]:
            assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
            assert shard["index_sha256"] == hashlib.sha256((out / shard["index"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


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


def test_tokenizer_fingerprint_changes_with_any_file(tiny, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], copy)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tiny["tokenizer"])
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tiny["tokenizer"])


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


def test_rerun_replaces_old_shards_and_refuses_foreign_files(tiny, tmp_path):
    out = tmp_path / "out"
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, shard_tokens=300)
    tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out)  # one shard now: the old ones must be gone
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.bin", "train_00000.idx.npy"]
    (out / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="holds files that are not shards"):
        tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out)


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


# ---------------------------------------------------------------------------------------------- readers


def read_all(paths: list[str], text_field: str = "text") -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(iter_documents(expand_inputs(paths), text_field, stats)), stats


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError) as info:
        read_all([str(path)])
    assert str(info.value) == (f"{path}:2: not valid JSON (Expecting value at column 10); "
                               "fix the record or remove the line")


def test_missing_or_non_string_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "x", "id": 3}\n')
    with pytest.raises(DataError) as info:
        read_all([str(path)])
    assert str(info.value) == (f"{path}:3: record has no field 'text' (fields: 'body', 'id'); fix the record or "
                               "pass --text-field with the field that holds the text (now 'text')")
    path.write_text('{"text": 12}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'text' is a JSON number, not a string; fix the record"):
        read_all([str(path)])
    path.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: record is a JSON array, not an object"):
        read_all([str(path)])


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_all([str(path)])
    assert str(info.value) == (f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14); fix the record or re-encode "
                               "the file as UTF-8")
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"line one\nline two\nbad \xff here\n")
    with pytest.raises(DataError, match=r"d\.txt:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        read_all([str(txt)])


def test_unmatched_glob_and_unsupported_file(tmp_path):
    pattern = str(tmp_path / "nothing*.jsonl")
    with pytest.raises(DataError) as info:
        expand_inputs([pattern])
    assert str(info.value).startswith(f"input {pattern!r} matches no file;")
    (tmp_path / "x.xlsx").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.xlsx: unsupported input type; use \.jsonl/\.jsonl\.gz/\.jsonl\.zst, "
                                        r"\.parquet, \.csv or \.txt"):
        expand_inputs([str(tmp_path / "x.xlsx")])


def test_inputs_expand_in_order_and_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.txt", "sub/a.txt", "skip.xlsx"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert expand_inputs([str(tmp_path / "sub"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]) == [
        str(tmp_path / "sub/a.txt"), str(tmp_path / "sub/c.txt"), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_empty_documents_are_dropped_and_counted(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n{"text": "  \\n\\t"}\n{"text": "two"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    docs, stats = read_all([str(path), str(tmp_path / "empty.txt")])
    assert [(d.text, d.line) for d in docs] == [("one", 1), ("two", 4)]
    assert (stats.docs_read, stats.docs_empty_dropped) == (5, 3)
    manifest = tokenize_corpus([str(path), str(tmp_path / "empty.txt")], tiny["tokenizer"], tmp_path / "out")
    assert manifest["counts"]["docs_read"] == 5 and manifest["counts"]["docs_empty_dropped"] == 3
    assert manifest["splits"]["train"]["num_docs"] == 2


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_demo_corpus_tokenizer_tokenize_verify(tmp_path):
    corpus, tok, out = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "shards"
    assert run_cli("demo-corpus", "--output", str(corpus), "--max-mb", "0.3").returncode == 0
    first = json.loads(corpus.read_text().splitlines()[0])
    assert set(first) == {"text"} and 300_000 <= sum(len(json.loads(line)["text"].encode())
                                                   for line in corpus.read_text().splitlines()) < 1_000_000
    assert run_cli("tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab-size", "500").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tok"]  # no temp dir left behind
    proc = run_cli("tokenize", "--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tok), "--output", str(out),
                   "--val-fraction", "0.1", "--shard-tokens", "20_000", "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert "backend gigatoken" in proc.stderr and "tokenize done:" in proc.stderr
    manifest = load_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) > 1 and manifest["splits"]["val"]["num_docs"] >= 1

    proc = run_cli("verify", str(out))
    assert proc.returncode == 0 and proc.stdout.startswith("OK")
    shard = out / manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[11] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", str(out))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{shard}: sha256 differs from the manifest (file changed or corrupt)"]


def test_demo_corpus_sft_and_classification_records_come_from_stdlib_definitions(tmp_path):
    import ast
    import inspect
    import json as json_module

    for kind in ("sft", "classification"):
        assert run_cli("demo-corpus", "--kind", kind, "--output", str(tmp_path / f"{kind}.jsonl"),
                       "--max-mb", "0.05").returncode == 0
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    cls = [json.loads(line) for line in (tmp_path / "classification.jsonl").read_text().splitlines()]
    assert min(len(sft), len(cls)) > 50 and all(set(r) == {"prompt", "response"} for r in sft)
    for record, example in zip(sft, cls):  # the same definitions in the same order
        assert record["prompt"] == f"Docstring: {example['text']}\nDefinition:"
        assert record["response"].startswith(" def " if example["label"] == "function" else " class ")
    assert {r["label"] for r in cls} == {"function", "class"}
    # A known stdlib definition appears exactly as Python reports it.
    doc = " ".join(inspect.getdoc(json_module.dumps).split("\n\n")[0].split())
    name = ast.parse(inspect.getsource(json_module.dumps)).body[0]
    full = tmp_path / "all.jsonl"
    assert run_cli("demo-corpus", "--kind", "sft", "--output", str(full), "--max-mb", "100").returncode == 0
    records = [json.loads(line) for line in full.read_text().splitlines()]
    assert {"prompt": f"Docstring: {doc}\nDefinition:", "response": f" def dumps({ast.unparse(name.args)}):"} in records


def test_cli_data_error_prints_message_and_exits_2(tmp_path):
    proc = run_cli("tokenize", "--input", str(tmp_path / "missing*.jsonl"), "--tokenizer", str(tmp_path),
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: input '{tmp_path / 'missing*.jsonl'}' matches no file")
    assert "Traceback" not in proc.stderr
    proc = run_cli("verify", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'manifest.json'}: not found")


def test_data_prep_never_imports_torch_transformers_or_deepspeed(tiny, tmp_path):
    code = f"""
import sys
import data_prep.__main__, data_prep.backend, data_prep.demo_corpus, data_prep.manifest, data_prep.pipeline
import data_prep.readers, data_prep.shards, data_prep.splits, data_prep.train_tokenizer, data_prep.verify
import data_prep.records, data_prep.blend, data_prep.progress, data_prep.encode, data_prep.workers
import data_prep.parts, data_prep.resume_state, data_prep.assemble, data_prep.pieces, data_prep.hf_datasets
import data_prep.files, data_prep.faults
from data_prep.pipeline import tokenize_corpus
tokenize_corpus([{str(tiny["jsonl"])!r}], {str(tiny["tokenizer"])!r}, {str(tmp_path / "out")!r})
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "deepspeed"}}))
print("tqdm" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # tqdm only for a progress bar on a terminal (stderr is captured here): its import is ~50 ms of start-up.
    assert proc.stdout.split() == ["[]", "False"]
