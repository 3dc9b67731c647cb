"""`verify`: re-check a shard directory against its manifest (sizes, sha256 of every file incl. sft masks and
classification labels, index consistency)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_prep.manifest import load_manifest

CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path, sha256: str, size: int | None = None) -> list[str]:
    """The problem with one file (missing, wrong size, wrong sha256), or none."""
    if not path.is_file():
        return [f"{path}: missing"]
    if size is not None and path.stat().st_size != size:
        return [f"{path}: {path.stat().st_size} bytes, manifest says {size}"]
    if _sha256(path) != sha256:
        return [f"{path}: sha256 differs from the manifest (file changed or corrupt)"]
    return []


def verify_shards(directory: str | Path) -> tuple[list[str], dict]:
    """(problems, manifest): one line per problem, empty when everything matches. A missing or unreadable
    manifest raises DataError."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    problems = []
    for split, info in manifest["splits"].items():
        shards = info["shards"]
        if sum(s["num_tokens"] for s in shards) != info["num_tokens"]:
            problems.append(f"{split}: shard num_tokens do not add up to the split's {info['num_tokens']}")
        if sum(s["num_docs"] for s in shards) != info["num_docs"]:
            problems.append(f"{split}: shard num_docs do not add up to the split's {info['num_docs']}")
        for shard in shards:
            path, index = directory / shard["file"], directory / shard["index"]
            problems += _check_file(path, shard["sha256"], shard["num_tokens"] * itemsize)
            index_problems = _check_file(index, shard["index_sha256"])
            problems += index_problems
            if not index_problems:
                offsets = np.load(index, allow_pickle=False)
                if (len(offsets) != shard["num_docs"] + 1 or offsets[0] != 0
                        or offsets[-1] != shard["num_tokens"] or np.any(np.diff(offsets) <= 0)):
                    problems.append(f"{index}: offsets are not 0 .. num_tokens, increasing, num_docs + 1 long")
            if "mask" in shard:  # sft: uint8 per token
                problems += _check_file(directory / shard["mask"], shard["mask_sha256"], shard["num_tokens"])
            if "labels" in shard:  # classification: int64 per document
                labels = directory / shard["labels"]
                label_problems = _check_file(labels, shard["labels_sha256"])
                problems += label_problems
                if not label_problems:
                    values = np.load(labels, allow_pickle=False)
                    num_labels = manifest.get("classification", {}).get("num_labels", 0)
                    if len(values) != shard["num_docs"] or (len(values) and (values.min() < 0
                                                                             or values.max() >= num_labels)):
                        problems.append(f"{labels}: not num_docs label ids in [0, num_labels)")
    return problems, manifest
