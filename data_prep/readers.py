"""Documents from input files: expand files/directories/globs, then stream `.jsonl` and `.txt` documents.

Everything is a generator, so a corpus of any size is read one line (jsonl) or one file (txt) at a time. Malformed
input stops the run with a `DataError` that names `file:line` and the fix; it is never skipped silently, because a
silently shrunk corpus is worse than a stopped run.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from data_prep.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".txt")


class Document(NamedTuple):
    text: str
    source: str  # the input file, as expanded
    line: int  # 1-based line of the record (jsonl) or 1 (txt: the whole file is one document)


@dataclass
class ReadStats:
    """Counters updated while reading; `docs_read` includes the empty documents that were dropped."""

    docs_read: int = 0
    docs_empty_dropped: int = 0
    bytes_read: int = 0

    def as_dict(self) -> dict:
        return {"docs_read": self.docs_read, "docs_empty_dropped": self.docs_empty_dropped,
                "bytes_read": self.bytes_read}


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")


def _supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Input arguments -> the list of files to read.

    Arguments keep the order given; each one expands deterministically: a file is itself, a directory is every
    supported file under it (recursively, sorted by path), a glob is its matches (sorted). A file listed twice is
    read once. A pattern that matches nothing is an error (a typo must not silently drop a part of the corpus).
    """
    files: list[str] = []
    seen: set[str] = set()
    for arg in inputs:
        if os.path.isfile(arg):
            if not _supported(arg):
                raise DataError(f"{arg}: unsupported input type; use .jsonl (one JSON object per line) or .txt "
                                "(one document per file)")
            matches = [arg]
        elif os.path.isdir(arg):
            matches = sorted(str(p) for p in Path(arg).rglob("*") if p.is_file() and _supported(p.name))
            if not matches:
                raise DataError(f"{arg}: directory holds no .jsonl or .txt files")
        else:
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            matches = [p for p in found if _supported(p)]
            if not matches:
                what = "matches only unsupported files (use .jsonl or .txt)" if found else "matches no file"
                raise DataError(f"input {arg!r} {what}; check the path or pattern (quote globs so the shell "
                                "does not expand them)")
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    if not files:
        raise DataError("no input files given")
    return files


def _decode(raw: bytes, source: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Report where the bad byte is instead of a codec traceback; for a .txt file, find its line.
        line += raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{source}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                        "fix the record or re-encode the file as UTF-8") from None


def _jsonl_documents(path: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    hint_field = f"pass --text-field with the field that holds the text (now {text_field!r})"
    with open(path, "rb") as f:  # binary, so a bad byte is reported with its line instead of a codec crash
        for number, raw in enumerate(f, start=1):
            stats.bytes_read += len(raw)
            line = _decode(raw, path, number)
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "fix the record or remove the line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: record is a JSON {_json_type(record)}, not an object; "
                                "fix the record or remove the line")
            if text_field not in record:
                fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                raise DataError(f"{path}:{number}: record has no field {text_field!r} (fields: {fields}); "
                                f"fix the record or {hint_field}")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} is a JSON {_json_type(text)}, not a "
                                f"string; fix the record or {hint_field}")
            yield Document(text, path, number)


def _txt_documents(path: str, stats: ReadStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        raw = f.read()
    stats.bytes_read += len(raw)
    yield Document(_decode(raw, path, 1), path, 1)


def iter_documents(files: Iterable[str], text_field: str = "text", stats: ReadStats | None = None
                   ) -> Iterator[Document]:
    """Non-empty documents of `files` in order; empty or whitespace-only ones are dropped and counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        docs = _jsonl_documents(path, text_field, stats) if path.endswith(".jsonl") else _txt_documents(path, stats)
        for doc in docs:
            stats.docs_read += 1
            if not doc.text.strip():
                stats.docs_empty_dropped += 1
                continue
            yield doc
