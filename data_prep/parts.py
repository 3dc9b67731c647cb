"""Parts: what each work unit of `tokenize` writes under `<output>/.parts/`, and what assembly reads back.

Unit u's part is `u<u:06d>.tokens` (its token ids, the run's dtype), `.lengths.npy` (int64 document lengths),
`.mask` (uint8 per token, sft's loss mask or a BERT-style pair's token type ids, where the run has one),
`.labels.npy` (classification: per document, an index into the part's own label values) and `.json`, its meta,
written last: a part is complete once its json holds the run's part key, so a killed run's finished parts are kept
and only the others are redone.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from data_prep.errors import DataError
from data_prep.files import atomic_file, write_atomic

PARTS_DIR = ".parts"
PART_VERSION = 2  # of the part layout and the encoding in it (in the run key: parts of another version are redone)


def part_path(parts: Path, unit: int, what: str) -> Path:
    return parts / f"u{unit:06d}.{what}"


def write_part(parts: Path, unit: int, batches: Iterable[tuple], with_mask: bool, with_labels: bool
               ) -> tuple[int, int]:
    """Write unit `unit`'s arrays from `batches` of (tokens, document lengths, mask or None, labels or None);
    returns (documents, tokens). Each file lands atomically once all are written; an error while the batches are
    made (a bad record) leaves none of them."""
    lengths_all, labels_all, num_tokens = [], [], 0
    with contextlib.ExitStack() as files:
        tokens_file = files.enter_context(atomic_file(part_path(parts, unit, "tokens")))
        mask_file = files.enter_context(atomic_file(part_path(parts, unit, "mask"))) if with_mask else None
        for tokens, lengths, mask, labels in batches:
            tokens_file.write(memoryview(tokens).cast("B"))
            if with_mask:
                mask_file.write(memoryview(mask))
            lengths_all.append(lengths)
            labels_all.append(labels)
            num_tokens += len(tokens)
        lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
        np.save(files.enter_context(atomic_file(part_path(parts, unit, "lengths.npy"))), lengths)
        if with_labels:
            labels = np.concatenate(labels_all) if labels_all else np.zeros(0, dtype=np.int64)
            np.save(files.enter_context(atomic_file(part_path(parts, unit, "labels.npy"))), labels)
    return len(lengths), num_tokens


def write_meta(parts: Path, unit: int, meta: dict) -> None:
    """Write unit `unit`'s meta, which marks its part complete."""
    write_atomic(part_path(parts, unit, "json"), json.dumps(meta, indent=1))


def read_meta(parts: Path, unit: int) -> dict:
    return json.loads(part_path(parts, unit, "json").read_text(encoding="utf-8"))


def part_done(parts: Path, unit: int, part_key: str) -> bool:
    """Whether unit `unit` has a complete part of the run whose part key is `part_key`."""
    try:
        return read_meta(parts, unit).get("key") == part_key
    except (OSError, json.JSONDecodeError):
        return False


def read_part(parts: Path, unit: int, meta: dict, dtype: np.dtype, with_mask: bool, label_map: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(tokens, document lengths, mask or None, label ids or None: the part's label indices through `label_map`)
    of unit `unit`. A part that does not match its meta is damaged: its meta is removed, so that a re-run redoes
    the unit, and the DataError says so."""
    try:
        tokens = np.fromfile(part_path(parts, unit, "tokens"), dtype=dtype)
        lengths = np.load(part_path(parts, unit, "lengths.npy"))
        mask = np.fromfile(part_path(parts, unit, "mask"), dtype=np.uint8) if with_mask else None
        labels = label_map[np.load(part_path(parts, unit, "labels.npy"))] if label_map is not None else None
        ok = (len(tokens) == meta["num_tokens"] and len(lengths) == meta["num_docs"]
              and int(lengths.sum()) == len(tokens) and (mask is None or len(mask) == len(tokens)))
    except (OSError, ValueError, IndexError):
        ok = False
    if not ok:
        part_path(parts, unit, "json").unlink(missing_ok=True)
        raise DataError(f"{part_path(parts, unit, 'tokens')}: part of unit {unit} is damaged (a crash?); re-run the "
                        "same command to redo it")
    return tokens, lengths, mask, labels
