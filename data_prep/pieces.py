"""What every input format shares: the piece of a file a reader reads, the counters it keeps, and the bad record it
yields in place of a record it cannot read (`data_prep.readers` for files, `data_prep.hf_datasets` for hf: inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Piece(NamedTuple):
    """Part of one input file: bytes [start, end) (plain jsonl, paragraph txt), row groups [start, end) (parquet),
    record batches [start, end) (arrow), or the whole file (start 0, end -1)."""

    path: str
    start: int
    end: int


@dataclass
class ReadStats:
    """Counters updated while reading; `docs_read` counts every record, including the dropped and skipped ones."""

    docs_read: int = 0
    docs_empty_dropped: int = 0
    bytes_read: int = 0
    bad_records: dict = field(default_factory=dict)  # reason -> count (--on-bad-record skip)

    def as_dict(self) -> dict:
        return {"docs_read": self.docs_read, "docs_empty_dropped": self.docs_empty_dropped,
                "bytes_read": self.bytes_read, "bad_records": dict(sorted(self.bad_records.items()))}

    def add(self, other: dict) -> None:
        self.docs_read += other["docs_read"]
        self.docs_empty_dropped += other["docs_empty_dropped"]
        self.bytes_read += other["bytes_read"]
        for reason, n in other["bad_records"].items():
            self.bad_records[reason] = self.bad_records.get(reason, 0) + n


class BadRecord(Exception):
    """A record that cannot be used. Readers yield it in the record's place (bad JSON, bad UTF-8, ...);
    `data_prep.records` raises it for a record whose fields do not fit the record kind."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # stable id counted in the manifest: invalid_utf8, invalid_json, not_an_object, ...
        self.message = message  # without the location; the caller prefixes "<file>:<line>: "


def too_large(size: int, max_bytes: int, what: str = "record") -> BadRecord:
    """The record_too_large BadRecord of a record (or `what`) of `size` bytes, over `max_bytes`."""
    return BadRecord("record_too_large", f"{what} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB "
                                         "limit per record; split the document, raise --max-record-mb (tokenizing "
                                         "a record takes ~150x its size in memory) or pass --on-bad-record skip")


def json_type(value) -> str:
    """The JSON type of a parsed value, as messages name it (object, array, string, number, boolean, null)."""
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")
