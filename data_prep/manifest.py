"""`manifest.json`: what a shard directory holds and which tokenizer made it; built, written and loaded here.

The manifest is written last, atomically, after every shard is complete: a directory with a manifest is complete,
one without is not (a crashed run). `tokenizer_fingerprint` lets training check that a tokenizer dir is the one
the shards were made with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data_prep.errors import DataError
from data_prep.files import write_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The files that define a HF tokenizer (what transformers' save_pretrained writes for one): the fingerprint covers
# these and nothing else, so a stray file in the directory (model weights, a log) neither changes it nor is read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")
TOKENIZER_DIRS = ("additional_chat_templates",)  # named chat templates, <name>.jinja


def tokenizer_files(directory: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the tokenizer files `directory` holds, sorted by relative path."""
    files = [(name, directory / name) for name in TOKENIZER_FILES if (directory / name).is_file()]
    for sub in TOKENIZER_DIRS:
        if (directory / sub).is_dir():
            files += [(p.relative_to(directory).as_posix(), p) for p in (directory / sub).rglob("*") if p.is_file()]
    return sorted(files)


def tokenizer_fingerprint(directory: str | Path) -> str:
    """sha256 over the tokenizer files of the directory (`TOKENIZER_FILES`, `TOKENIZER_DIRS`), sorted by relative
    path (posix): for each file, its relative path (UTF-8), a NUL byte, its size as 8 bytes little-endian, then its
    bytes, read in 1 MiB chunks. Any change to any of these files changes it; other files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: tokenizer directory does not exist")
    digest = hashlib.sha256()
    for name, path in tokenizer_files(directory):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                digest.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "little"))
                read = 0
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    read += len(chunk)
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
        if read != size:
            raise DataError(f"{path}: changed while it was read; re-run when the tokenizer directory is complete")
    return digest.hexdigest()


def build_manifest(*, tokenizer_dir: str | Path, vocab_size: int, special_ids: dict, backend: str, dtype: str,
                   splits: dict[str, list[dict]], inputs: list[str], val_fraction: float, counts: dict,
                   record_kind: str = "text", fingerprint: str | None = None, chat_template_sha256: str | None = None,
                   extra: dict | None = None, prep: dict | None = None) -> dict:
    """The manifest dict; `splits` maps a split name to its ShardWriter.close() entries. `extra` holds the record
    kind's section ("sft" or "classification"); `prep` what the output depends on (its `key` drives re-runs)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "record_kind": record_kind,
        "tokenizer": {"path": str(Path(tokenizer_dir).resolve()),
                      "fingerprint": fingerprint or tokenizer_fingerprint(tokenizer_dir),
                      "vocab_size": int(vocab_size), "eos_id": special_ids["eos_id"],
                      "bos_id": special_ids.get("bos_id"), "pad_id": special_ids.get("pad_id"), "backend": backend,
                      "chat_template_sha256": chat_template_sha256},
        "dtype": dtype,
        "splits": {name: {"num_tokens": sum(s["num_tokens"] for s in shards),
                          "num_docs": sum(s["num_docs"] for s in shards), "shards": shards}
                   for name, shards in splits.items()},
        "inputs": list(inputs),
        "val_fraction": float(val_fraction),
        "counts": dict(counts),
    }
    manifest.update(extra or {})
    if prep is not None:
        manifest["prep"] = prep
    return manifest


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write `manifest.json` atomically, so readers never see a partial manifest."""
    path = Path(directory) / MANIFEST_NAME
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(directory: str | Path) -> dict:
    """The manifest of a shard directory; DataError (naming the file) if missing, unreadable or of another version."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: not found; is {directory} the --output of `python -m data_prep tokenize`, and did "
                        "that run finish?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run `python -m data_prep tokenize`") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: unknown format_version {version!r} (this code reads {FORMAT_VERSION}); re-run "
                        "`python -m data_prep tokenize` with this version of data_prep")
    return manifest
