"""`verify`: re-check a shard directory against its manifest (sizes, sha256 of every file, index consistency)."""

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
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["num_tokens"] * itemsize:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says "
                                f"{shard['num_tokens'] * itemsize}")
            elif _sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
            if not index.is_file():
                problems.append(f"{index}: missing")
            elif _sha256(index) != shard["index_sha256"]:
                problems.append(f"{index}: sha256 differs from the manifest (file changed or corrupt)")
            else:
                offsets = np.load(index, allow_pickle=False)
                if (len(offsets) != shard["num_docs"] + 1 or offsets[0] != 0
                        or offsets[-1] != shard["num_tokens"] or np.any(np.diff(offsets) <= 0)):
                    problems.append(f"{index}: offsets are not 0 .. num_tokens, increasing, num_docs + 1 long")
    return problems, manifest
