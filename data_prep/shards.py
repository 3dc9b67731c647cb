"""The shard format (the contract with `train/`), its writer and its memmapped reader.

Per split, shard `k` is two files:
  `<split>_<k:05d>.bin`      raw little-endian token ids (uint16 if vocab_size <= 65535, else uint32); every
                             document's tokens are followed by the eos id.
  `<split>_<k:05d>.idx.npy`  np.int64 start offset of each document in that shard's tokens, num_docs + 1 long,
                             the last entry = the shard's num_tokens.
A document never straddles two shards; a new shard starts once the current one holds >= shard_tokens. The split's
shards, sizes and sha256s are listed in `manifest.json` (see `data_prep.manifest`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.manifest import load_manifest

__all__ = ["ShardWriter", "ShardSet", "load_manifest", "dtype_for_vocab", "shard_names"]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest token dtype that holds ids 0 .. vocab_size-1 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_names(split: str, k: int) -> tuple[str, str]:
    """(token file, index file) names of shard `k` of `split`."""
    return f"{split}_{k:05d}.bin", f"{split}_{k:05d}.idx.npy"


class ShardWriter:
    """Appends batches of documents to a split's shards, rolling over to a new shard at `shard_tokens`.

    Files are written under a temp name (`.<name>.tmp`) and renamed when the shard is complete; sha256 is updated
    from the bytes as they are written, so nothing is read back.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = int(shard_tokens)
        self.entries: list[dict] = []
        self._file = None  # the open temp .bin of the current shard, or None between shards

    def _open(self) -> None:
        self._bin_name, self._idx_name = shard_names(self.split, len(self.entries))
        self._tmp = self.out_dir / f".{self._bin_name}.tmp"
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []  # document lengths of this shard, one array per add() slice
        self._num_tokens = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append whole documents: `tokens` is their ids concatenated (eos included), `doc_lengths` their sizes."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but {len(tokens)} tokens were given")
        ends = np.cumsum(doc_lengths)
        first_doc, first_token = 0, 0
        # One iteration per shard touched, not per document: a slice of documents goes into each shard.
        while first_doc < len(doc_lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._num_tokens  # > 0 while the shard is open
            # Documents up to and including the one that brings the shard to >= shard_tokens.
            last_doc = min(int(np.searchsorted(ends, first_token + room, side="left")), len(doc_lengths) - 1)
            end_token = int(ends[last_doc])
            chunk = tokens[first_token:end_token]
            self._file.write(memoryview(chunk).cast("B"))
            self._sha.update(memoryview(chunk).cast("B"))
            self._lengths.append(doc_lengths[first_doc:last_doc + 1])
            self._num_tokens += len(chunk)
            first_doc, first_token = last_doc + 1, end_token
            if self._num_tokens >= self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        """Close the current shard: fsync + rename its tokens, write its index, record its entry."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.out_dir / self._bin_name)
        lengths = np.concatenate(self._lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buffer = io.BytesIO()
        np.save(buffer, offsets)  # .npy bytes built in memory so they are hashed once, as written
        index_bytes = buffer.getvalue()
        tmp_index = self.out_dir / f".{self._idx_name}.tmp"
        with open(tmp_index, "wb") as f:
            f.write(index_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_index, self.out_dir / self._idx_name)
        self.entries.append({"file": self._bin_name, "index": self._idx_name, "num_tokens": self._num_tokens,
                             "num_docs": len(lengths), "sha256": self._sha.hexdigest(),
                             "index_sha256": hashlib.sha256(index_bytes).hexdigest()})

    def close(self) -> list[dict]:
        """Finish the last (partial) shard; return every shard's manifest entry."""
        if self._file is not None:
            if self._num_tokens:
                self._finish()
            else:
                self.abort()
        return self.entries

    def abort(self) -> None:
        """Drop the shard in progress (after an error); completed shards stay, but no manifest will list them."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


class ShardSet:
    """Read-only view of one split of a shard directory; token files are memmapped on first use and cached.

    Attributes: `manifest` (dict), `split`, `dtype` (np.dtype), `num_tokens`, `num_shards`, `shard_num_tokens`.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        self.manifest = load_manifest(directory)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise DataError(f"{directory}: no split {split!r} in manifest.json; splits available: "
                            f"{', '.join(sorted(splits)) or 'none'}")
        self.split = split
        self._entries = splits[split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shard_num_tokens = [int(e["num_tokens"]) for e in self._entries]
        self.num_tokens = sum(self.shard_num_tokens)
        self.num_shards = len(self._entries)
        self._tokens: dict[int, np.memmap] = {}
        self._offsets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_shards

    def tokens(self, i: int) -> np.memmap:
        """Shard `i`'s tokens, a read-only 1-D memmap."""
        if i not in self._tokens:
            entry = self._entries[i]
            path = self.directory / entry["file"]
            expected = entry["num_tokens"] * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard listed in manifest.json is missing; re-run "
                                "`python -m data_prep tokenize`") from None
            if size != expected:
                raise DataError(f"{path}: {size} bytes but manifest.json says {expected}; the shard is damaged, "
                                "run `python -m data_prep verify` and re-run tokenize")
            self._tokens[i] = np.memmap(path, dtype=self.dtype, mode="r", shape=(entry["num_tokens"],))
        return self._tokens[i]

    def doc_offsets(self, i: int) -> np.ndarray:
        """Shard `i`'s document start offsets (int64, num_docs + 1 long, last = the shard's num_tokens)."""
        if i not in self._offsets:
            path = self.directory / self._entries[i]["index"]
            try:
                self._offsets[i] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read shard index ({exc}); re-run `python -m data_prep tokenize`"
                                ) from None
        return self._offsets[i]

    def __getstate__(self) -> dict:
        # Pickled into worker processes without the open memmaps (which would be copied); reopened lazily there.
        state = self.__dict__.copy()
        state["_tokens"], state["_offsets"] = {}, {}
        return state
