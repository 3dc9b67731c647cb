"""The shard format (the contract with `train/`), its writer and its memmapped reader.

Per split, shard `k` is two files:
  `<split>_<k:05d>.bin`      raw little-endian token ids (uint16 if vocab_size <= 65535, else uint32); every
                             document's tokens are followed by the eos id.
  `<split>_<k:05d>.idx.npy`  np.int64 start offset of each document in that shard's tokens, num_docs + 1 long,
                             the last entry = the shard's num_tokens.
For record_kind sft, also `<split>_<k:05d>.mask.bin` (uint8 per token, 1 = loss on this token); for
classification `<split>_<k:05d>.labels.npy` (np.int64 label id per document) and, for text pairs of a tokenizer whose
framing gives token type ids (BERT), the same `.mask.bin` holding each token's type id. See docs/data_prep.md.
A document never straddles two shards; a new shard starts once the current one holds >= shard_tokens. The split's
shards, sizes and sha256s are listed in `manifest.json` (see `data_prep.manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.files import atomic_file, write_atomic
from data_prep.manifest import load_manifest

__all__ = ["ShardWriter", "ShardSet", "load_manifest", "dtype_for_vocab", "shard_names", "extra_names"]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest token dtype that holds ids 0 .. vocab_size-1 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_names(split: str, k: int) -> tuple[str, str]:
    """(token file, index file) names of shard `k` of `split`."""
    return f"{split}_{k:05d}.bin", f"{split}_{k:05d}.idx.npy"


def extra_names(split: str, k: int) -> tuple[str, str]:
    """(sft loss-mask file, classification labels file) names of shard `k` of `split`."""
    return f"{split}_{k:05d}.mask.bin", f"{split}_{k:05d}.labels.npy"


class _ShardDropped(Exception):
    """Closes a dropped shard's open files (`ShardWriter.abort`)."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)  # .npy bytes built in memory so they are hashed once, as written
    return buffer.getvalue()


class ShardWriter:
    """Appends batches of documents to a split's shards, rolling over to a new shard at `shard_tokens`.

    Files are written under a temporary name and renamed when the shard is complete (`data_prep.files`); sha256 is
    updated from the bytes as they are written, so nothing is read back. `with_mask` (sft) writes a parallel uint8
    `.mask.bin` per shard; `with_labels` (classification) a per-document int64 `.labels.npy`.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype, shard_tokens: int, with_mask: bool = False,
                 with_labels: bool = False):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = int(shard_tokens)
        self.with_mask, self.with_labels = with_mask, with_labels
        self.entries: list[dict] = []
        self._files: contextlib.ExitStack | None = None  # the current shard's open files; None between shards

    def _open(self) -> None:
        self._bin_name, self._idx_name = shard_names(self.split, len(self.entries))
        self._mask_name, self._labels_name = extra_names(self.split, len(self.entries))
        self._files = contextlib.ExitStack()
        self._file = self._files.enter_context(atomic_file(self.out_dir / self._bin_name))
        self._sha = hashlib.sha256()
        if self.with_mask:
            self._mask_file = self._files.enter_context(atomic_file(self.out_dir / self._mask_name))
            self._mask_sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []  # document lengths of this shard, one array per add() slice
        self._labels: list[np.ndarray] = []
        self._num_tokens = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, mask: np.ndarray | None = None,
            labels: np.ndarray | None = None) -> None:
        """Append whole documents: `tokens` is their ids concatenated (eos included), `doc_lengths` their sizes,
        `mask` one uint8 per token (with_mask), `labels` one int per document (with_labels)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but {len(tokens)} tokens were given")
        if self.with_mask:
            mask = np.ascontiguousarray(mask, dtype=np.uint8)
            if len(mask) != len(tokens):
                raise ValueError("mask must hold one entry per token")
        if self.with_labels:
            labels = np.asarray(labels, dtype=np.int64)
            if len(labels) != len(doc_lengths):
                raise ValueError("labels must hold one entry per document")
        ends = np.cumsum(doc_lengths)
        first_doc, first_token = 0, 0
        # One iteration per shard touched, not per document: a slice of documents goes into each shard.
        while first_doc < len(doc_lengths):
            if self._files is None:
                self._open()
            room = self.shard_tokens - self._num_tokens  # > 0 while the shard is open
            # Documents up to and including the one that brings the shard to >= shard_tokens.
            last_doc = min(int(np.searchsorted(ends, first_token + room, side="left")), len(doc_lengths) - 1)
            end_token = int(ends[last_doc])
            chunk = tokens[first_token:end_token]
            self._file.write(memoryview(chunk).cast("B"))
            self._sha.update(memoryview(chunk).cast("B"))
            if self.with_mask:
                mask_chunk = memoryview(mask[first_token:end_token])
                self._mask_file.write(mask_chunk)
                self._mask_sha.update(mask_chunk)
            if self.with_labels:
                self._labels.append(labels[first_doc:last_doc + 1])
            self._lengths.append(doc_lengths[first_doc:last_doc + 1])
            self._num_tokens += len(chunk)
            first_doc, first_token = last_doc + 1, end_token
            if self._num_tokens >= self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        """Close the current shard: its tokens (and mask) land, then its index (and labels); record it."""
        files, self._files = self._files, None
        files.close()
        entry = {"file": self._bin_name, "index": self._idx_name, "num_tokens": self._num_tokens}
        lengths = np.concatenate(self._lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        index_sha = write_atomic(self.out_dir / self._idx_name, _npy_bytes(offsets))
        entry.update({"num_docs": len(lengths), "sha256": self._sha.hexdigest(), "index_sha256": index_sha})
        if self.with_mask:
            entry.update({"mask": self._mask_name, "mask_sha256": self._mask_sha.hexdigest()})
        if self.with_labels:
            labels = np.concatenate(self._labels).astype(np.int64)
            entry.update({"labels": self._labels_name,
                          "labels_sha256": write_atomic(self.out_dir / self._labels_name, _npy_bytes(labels))})
        self.entries.append(entry)

    def close(self) -> list[dict]:
        """Finish the last (partial) shard; return every shard's manifest entry."""
        if self._files is not None:
            if self._num_tokens:
                self._finish()
            else:
                self.abort()
        return self.entries

    def abort(self) -> None:
        """Drop the shard in progress (after an error); completed shards stay, but no manifest will list them."""
        if self._files is not None:
            files, self._files = self._files, None
            with contextlib.suppress(_ShardDropped), files:
                raise _ShardDropped  # closed by an exception, each open file removes its temporary


class ShardSet:
    """Read-only view of one split of a shard directory; token files are memmapped on first use and cached.

    Attributes: `manifest` (dict), `split`, `dtype` (np.dtype), `num_tokens`, `num_shards`, `shard_num_tokens`,
    `shard_num_docs`.
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
        self.shard_num_docs = [int(e["num_docs"]) for e in self._entries]
        self.num_tokens = sum(self.shard_num_tokens)
        self.num_shards = len(self._entries)
        self._tokens: dict[int, np.memmap] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.memmap] = {}
        self._labels: dict[int, np.ndarray] = {}

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

    def loss_mask(self, i: int) -> np.memmap:
        """sft: shard `i`'s loss mask, uint8 per token (1 = train on this token), a read-only memmap."""
        return self._per_token(i)

    def token_type_ids(self, i: int) -> np.memmap:
        """classification pairs with `manifest.classification.token_type_ids`: shard `i`'s token type id per token
        (uint8), a read-only memmap."""
        return self._per_token(i)

    def _per_token(self, i: int) -> np.memmap:
        if i in self._masks:
            return self._masks[i]
        entry = self._entries[i]
        if "mask" not in entry:
            raise DataError(f"{self.directory}: record_kind {self.manifest.get('record_kind')!r} has no per-token "
                            "loss mask or token types")
        path = self.directory / entry["mask"]
        if not path.is_file() or path.stat().st_size != entry["num_tokens"]:
            raise DataError(f"{path}: missing or not {entry['num_tokens']} bytes; run `python -m data_prep verify`")
        self._masks[i] = np.memmap(path, dtype=np.uint8, mode="r", shape=(entry["num_tokens"],))
        return self._masks[i]

    def labels(self, i: int) -> np.ndarray:
        """classification: shard `i`'s label id per document (int64, num_docs long)."""
        if i in self._labels:
            return self._labels[i]
        entry = self._entries[i]
        if "labels" not in entry:
            raise DataError(f"{self.directory}: record_kind {self.manifest.get('record_kind')!r} has no labels")
        try:
            self._labels[i] = np.load(self.directory / entry["labels"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.directory / entry['labels']}: cannot read labels ({exc})") from None
        return self._labels[i]

    def __getstate__(self) -> dict:
        # Pickled into worker processes without the open memmaps (which would be copied); reopened lazily there.
        state = self.__dict__.copy()
        state["_tokens"], state["_offsets"], state["_masks"], state["_labels"] = {}, {}, {}, {}
        return state
