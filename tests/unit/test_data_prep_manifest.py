"""data_prep.manifest: every field of manifest.json and its checksums, and the tokenizer fingerprint (over the
tokenizer's own files only, changed by any of them)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

from data_prep.manifest import tokenizer_fingerprint
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import load_manifest


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


def test_tokenizer_fingerprint_changes_with_any_file(tiny, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], copy)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tiny["tokenizer"])
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tiny["tokenizer"])


def _legacy_fingerprint(directory) -> str:
    """The fingerprint before it was limited to tokenizer files: every file of the directory."""
    digest = hashlib.sha256()
    for name, path in sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def test_fingerprint_covers_tokenizer_files_only_and_never_reads_a_stray_file(tiny, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], copy)
    original = tokenizer_fingerprint(copy)
    assert original == _legacy_fingerprint(tiny["tokenizer"])  # manifests written before the change still match
    with open(copy / "model.safetensors", "wb") as f:  # a sparse 1.5 GB stray file
        f.truncate(1_500_000_000)
    (copy / "notes.txt").write_text("hello")
    start = time.perf_counter()
    assert tokenizer_fingerprint(copy) == original
    assert time.perf_counter() - start < 1.0
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    with_template = tokenizer_fingerprint(copy)
    assert with_template != original
    (copy / "additional_chat_templates").mkdir()
    (copy / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")
    assert tokenizer_fingerprint(copy) not in (original, with_template)
