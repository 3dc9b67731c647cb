"""Input files -> raw records: expand files/directories/globs, plan them into work units, stream each format.

Formats (by file name): `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line), `.parquet` (read in record
batches through pyarrow), `.csv` (header row names the fields) and `.txt` (one document per file, or one per
blank-line separated block with `txt_mode="paragraph"`). Everything streams: a corpus is never held in memory.

A record that cannot be read (bad JSON, bad UTF-8, not an object, ...) comes out as a `BadRecord` (see
`data_prep.pieces`) with a stable `reason` and a message; `data_prep.records` decides whether that stops the run (the
default) or is counted and skipped. Problems that concern a whole file (a parquet/csv file without the requested
column, an unreadable file) always stop the run.

Work units: a plain `.jsonl` file, or a `.txt` file in paragraph mode, is cut into byte ranges of about
`chunk_bytes` that start at a line start (paragraph mode: after a blank line); a parquet file into runs of row
groups; `.gz`/`.zst`/`.csv`/one-document `.txt` files are read whole. Consecutive small pieces share a unit. The plan
depends only on the file list, the files' sizes/contents and `chunk_bytes`, never on the number of workers.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import orjson

from data_prep import hf_datasets
from data_prep.errors import DataError
from data_prep.pieces import BadRecord, Piece, ReadStats, json_type, too_large

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".csv", ".txt")
TXT_MODES = ("file", "paragraph")
# --max-record-mb: a record (jsonl line, txt document or paragraph, csv field, parquet value) over this size is a
# bad record (reason record_too_large), read without holding more than the limit. Tokenizing one text costs ~150x
# its size in memory (a 51 MB document took 8.1 GB and 80 s), and no sequence needs a document this long to be one
# record.
DEFAULT_MAX_RECORD_MB = 16.0
BOM = b"\xef\xbb\xbf"


def input_format(path: str) -> str | None:
    """'jsonl', 'parquet', 'csv', 'txt', 'arrow' (a split of an hf: input) or None (unsupported)."""
    if path.endswith(".arrow"):
        return "arrow"
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        if path.endswith(suffix):
            return "jsonl"
    for fmt in ("parquet", "csv", "txt"):
        if path.endswith("." + fmt):
            return fmt
    return None


def _supported(path: str) -> bool:
    return input_format(path) not in (None, "arrow")  # arrow files are read as part of an hf: dataset only


UNSUPPORTED_HINT = ("use .jsonl/.jsonl.gz/.jsonl.zst, .parquet, .csv or .txt, or hf:DIR / hf:NAME for a Hugging Face "
                    "dataset")


def expand_inputs(inputs: Iterable[str], hf_splits: list[str] | None = None,
                  splits_from_input: bool = False) -> list[str]:
    """Input arguments -> the list of files to read.

    Arguments keep the order given; each one expands deterministically: a file is itself, a directory is every
    supported file under it (recursively, sorted by path), a glob is its matches (sorted). A file listed twice is
    read once. A pattern that matches nothing is an error (a typo must not silently drop a part of the corpus).
    `hf:DIR` / `hf:NAME[:CONFIG]` is the arrow files of a Hugging Face dataset's splits (`data_prep.hf_datasets`;
    `hf_splits`, `splits_from_input` choose the splits).
    """
    files: list[str] = []
    seen: set[str] = set()
    if hf_splits and not any(arg.startswith("hf:") for arg in inputs):
        raise DataError("--hf-split chooses splits of hf: inputs; none is given")
    for arg in inputs:
        if arg.startswith("hf:"):
            matches = hf_datasets.expand(arg, hf_splits, splits_from_input)
        elif os.path.isfile(arg):
            if not _supported(arg):
                raise DataError(f"{arg}: unsupported input type; {UNSUPPORTED_HINT}")
            matches = [arg]
        elif os.path.isdir(arg):
            matches = sorted(str(p) for p in Path(arg).rglob("*") if p.is_file() and _supported(p.name))
            if not matches:
                raise DataError(f"{arg}: directory holds no supported input files ({UNSUPPORTED_HINT})")
        else:
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            matches = [p for p in found if _supported(p)]
            if not matches:
                what = f"matches only unsupported files ({UNSUPPORTED_HINT})" if found else "matches no file"
                raise DataError(f"input {arg!r} {what}; check the path or pattern (quote globs so the shell "
                                "does not expand them)")
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    if not files:
        raise DataError("no input files given")
    return files


# ---------------------------------------------------------------------------------------------- work units


def _splittable(path: str, txt_mode: str) -> bool:
    return path.endswith(".jsonl") or (path.endswith(".txt") and txt_mode == "paragraph")


def _next_boundary(f, target: int, paragraph: bool) -> int:
    """The first line start >= target (paragraph: the first position after a blank line at or after target)."""
    f.seek(target - 1)
    f.readline()  # ends the line holding byte target-1; we are now at a line start >= target
    if paragraph:
        while line := f.readline():
            if not line.strip():
                break
    return f.tell()


def _byte_ranges(path: str, size: int, chunk_bytes: int, paragraph: bool) -> list[tuple[int, int]]:
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = size if start + chunk_bytes >= size else min(_next_boundary(f, start + chunk_bytes, paragraph), size)
            ranges.append((start, end))
            start = end
    return ranges or [(0, 0)]


def _parquet_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise DataError(f"{path}: cannot be read as parquet ({exc})") from None
    ranges, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes:
            ranges.append((start, g + 1, size))
            start, size = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups, size))
    return ranges


class Unit(NamedTuple):
    pieces: list  # of Piece, in input order
    size: int  # approximate bytes on disk, for progress/ETA


def plan_units(files: list[str], chunk_bytes: int, txt_mode: str = "file") -> list[Unit]:
    """Deterministic work units (lists of pieces, in input order) of about `chunk_bytes` each."""
    units: list[Unit] = []
    current: list[Piece] = []
    current_size = 0
    for path in files:
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
        if _splittable(path, txt_mode):
            pieces = [(Piece(path, a, b), b - a) for a, b in _byte_ranges(path, size, chunk_bytes,
                                                                           path.endswith(".txt"))]
        elif path.endswith(".parquet"):
            ranges = _parquet_ranges(path, chunk_bytes)
            total = sum(s for _, _, s in ranges) or 1
            pieces = [(Piece(path, a, b), size * s // total) for a, b, s in ranges]
        elif path.endswith(".arrow"):  # an hf: split: runs of record batches
            ranges = hf_datasets.arrow_ranges(path, chunk_bytes)
            total = sum(s for _, _, s in ranges) or 1
            pieces = [(Piece(path, a, b), size * s // total) for a, b, s in ranges]
        else:
            pieces = [(Piece(path, 0, -1), size)]
        for piece, piece_size in pieces:
            if current and current_size + piece_size > chunk_bytes:
                units.append(Unit(current, current_size))
                current, current_size = [], 0
            current.append(piece)
            current_size += piece_size
    if current:
        units.append(Unit(current, current_size))
    return units


# ---------------------------------------------------------------------------------------------- formats

# Each reader yields (number, record) with number = 1-based line/row *within the piece* and record a dict, a str
# (txt) or a BadRecord. `location(piece, number)` turns that into "file:line" for messages.


def _decode_error(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, BadRecord]:
    """(extra lines before the bad byte, BadRecord) for a UTF-8 error in `raw`."""
    lines = raw.count(b"\n", 0, exc.start)
    column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
    return lines, BadRecord("invalid_utf8", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                                            "fix the record or re-encode the file as UTF-8")


def _truncated(path: str, detail: str) -> DataError:
    return DataError(f"{path}: cannot be decompressed (truncated: {detail}); the file is damaged or was cut short "
                     "(an interrupted copy or download?): copy or compress it again")


_ZSTD_MAGIC = 0xFD2FB528


def check_zstd_frames(path: str) -> None:
    """DataError if the .zst file ends inside a frame. python-zstandard's stream reader takes the end of its input
    as the end of the data, so a file cut short would be read in part without a word; this walks the frame and
    block headers (3 bytes per block of up to 128 KiB; nothing is decompressed). A file cut exactly between two
    frames is a valid zstd file of fewer frames and cannot be told apart."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        def read(pos: int, n: int) -> bytes:
            f.seek(pos)
            data = f.read(n)
            if len(data) < n:
                raise _truncated(path, f"the file ends inside a zstd frame, at byte {size:,}")
            return data

        pos = 0
        while pos < size:
            magic = int.from_bytes(read(pos, 4), "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame: magic, 4-byte size, data
                pos += 8 + int.from_bytes(read(pos + 4, 4), "little")
            elif magic != _ZSTD_MAGIC:
                raise DataError(f"{path}: cannot be decompressed (no zstd frame at byte {pos:,}); the file is damaged "
                                "or not zstd: copy or compress it again")
            else:
                desc = read(pos + 4, 1)[0]
                fcs, single, checksum, dict_id = desc >> 6, (desc >> 5) & 1, (desc >> 2) & 1, desc & 3
                pos += 5 + (1 - single) + (0, 1, 2, 4)[dict_id] + (single, 2, 4, 8)[fcs]
                while True:
                    header = int.from_bytes(read(pos, 3), "little")
                    last, kind, block_size = header & 1, (header >> 1) & 3, header >> 3
                    pos += 3 + (1 if kind == 1 else block_size)  # an RLE block holds one byte
                    if last:
                        break
                pos += 4 * checksum
            if pos > size:
                raise _truncated(path, f"the file ends inside a zstd frame, at byte {size:,}")


def _open_lines(piece: Piece):
    """A binary line iterator over the piece's bytes, and a closer."""
    path = piece.path
    if path.endswith(".gz"):
        f = gzip.open(path, "rb")
    elif path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        check_zstd_frames(path)
        raw = open(path, "rb")
        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    else:
        f = open(path, "rb", buffering=1 << 20)  # documents are long: an 8 KiB buffer makes readline ~5x slower
        if piece.end >= 0:
            f.seek(piece.start)
    return f


def _lines(piece: Piece, stats: ReadStats, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, line) for the piece's lines; a line longer than max_bytes comes out as its size (an int),
    read in bounded chunks and never held whole. A leading UTF-8 BOM of the file is dropped."""
    f = _open_lines(piece)
    try:
        remaining = piece.end - piece.start if piece.end >= 0 else -1
        number = 0
        while raw := f.readline(max_bytes + 1):
            number += 1
            size = len(raw)
            if size > max_bytes and not raw.endswith(b"\n"):
                raw = None
                while chunk := f.readline(1 << 20):  # the rest of the line, dropped as it is read
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
            stats.bytes_read += size
            if raw is None or size > max_bytes:
                yield number, size
            else:
                yield number, raw[3:] if number == 1 and piece.start == 0 and raw.startswith(BOM) else raw
            if remaining >= 0:
                remaining -= size
                if remaining <= 0:
                    break
    except EOFError as exc:  # gzip: the stream ends before its end-of-stream marker
        raise _truncated(piece.path, str(exc)) from None
    except OSError as exc:  # corrupt .gz
        raise DataError(f"{piece.path}: cannot be decompressed ({exc}); the file is damaged") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise DataError(f"{piece.path}: cannot be decompressed ({exc}); the file is damaged") from None
        raise
    finally:
        f.close()


_INT64 = 2.0 ** 63


def _fast_record(raw: bytes) -> dict | None:
    """The line's record parsed by orjson (half the time of decode + json.loads, which JSON parsing under the GIL
    needs when gigatoken encodes at ~300 MB/s), or None where json.loads could read it differently: lines orjson
    rejects (json.loads accepts NaN, Infinity and lone surrogates, skips blank lines and words its own errors),
    non-objects, and top-level integers beyond 64 bits, which orjson turns into floats (a label field)."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(record) is not dict:
        return None
    for value in record.values():
        if type(value) is float and abs(value) >= _INT64 and value.is_integer():
            return None
    return record


def _jsonl_records(piece: Piece, stats: ReadStats, max_bytes: int) -> Iterator[tuple[int, object]]:
    for number, raw in _lines(piece, stats, max_bytes):
        if isinstance(raw, int):
            yield number, too_large(raw, max_bytes, "line")
            continue
        record = _fast_record(raw)
        if record is not None:
            yield number, record
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, _decode_error(raw, exc)[1]
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, BadRecord("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno}); "
                                                    "fix the record or remove the line")
            continue
        except RecursionError:  # orjson stops at 1024 levels, json.loads at Python's recursion limit
            yield number, BadRecord("invalid_json", "not valid JSON (nested too deeply); fix the record or remove "
                                                    "the line")
            continue
        if not isinstance(record, dict):
            yield number, BadRecord("not_an_object", f"record is a JSON {json_type(record)}, not an object; "
                                                     "fix the record or remove the line")
            continue
        yield number, record


def _txt_records(piece: Piece, stats: ReadStats, txt_mode: str, max_bytes: int) -> Iterator[tuple[int, object]]:
    if txt_mode == "file":
        with open(piece.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                stats.bytes_read += size
                yield 1, too_large(size, max_bytes, "the file (one document with --txt-mode file; "
                                                      "--txt-mode paragraph reads one per blank-line block)")
                return
            raw = f.read()
        stats.bytes_read += len(raw)
        if raw.startswith(BOM):
            raw = raw[3:]
        try:
            yield 1, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            lines, bad = _decode_error(raw, exc)
            yield 1 + lines, bad
        return
    block: list[bytes] = []
    first, size = 0, 0  # the block's first line and its bytes so far
    for number, raw in _lines(piece, stats, max_bytes):
        if isinstance(raw, int) or raw.strip():
            if not size:
                first = number
            size += raw if isinstance(raw, int) else len(raw)
            if size <= max_bytes:
                block.append(raw)
            else:  # too large: count on, hold nothing
                block = []
            continue
        if size:
            yield (first, too_large(size, max_bytes, "paragraph")) if size > max_bytes else _txt_block(block, first)
            block, size = [], 0
    if size:
        yield (first, too_large(size, max_bytes, "paragraph")) if size > max_bytes else _txt_block(block, first)


def _txt_block(block: list[bytes], first: int) -> tuple[int, object]:
    raw = b"".join(block)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lines, bad = _decode_error(raw, exc)
        return first + lines, bad
    return first, text[:-1] if text.endswith("\n") else text


def _check_columns(path: str, columns: list[str], fields: list[tuple[str, str]]) -> None:
    for field, flag in fields:
        if field not in columns:
            shown = ", ".join(repr(c) for c in columns[:10]) or "none"
            raise DataError(f"{path}: no column {field!r} (columns: {shown}); pass {flag} with the column that "
                            "holds it")


def _parquet_records(piece: Piece, stats: ReadStats, fields: list[tuple[str, str]], max_bytes: int
                     ) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(piece.path)
    except Exception as exc:
        raise DataError(f"{piece.path}: cannot be read as parquet ({exc})") from None
    columns = pf.schema_arrow.names
    _check_columns(piece.path, columns, fields)
    names = list(dict.fromkeys(f for f, _ in fields))
    meta = pf.metadata
    start, end = (piece.start, piece.end) if piece.end >= 0 else (0, meta.num_row_groups)
    number = 0  # row number inside the piece
    for batch in pf.iter_batches(batch_size=4096, row_groups=list(range(start, end)), columns=names):
        stats.bytes_read += batch.nbytes
        values = [batch.column(name).to_pylist() for name in names]
        for row in zip(*values):
            number += 1
            sizes = [len(v.encode("utf-8", "surrogatepass")) for v in row
                     if isinstance(v, str) and len(v) > max_bytes // 4]
            yield number, too_large(max(sizes), max_bytes, "a value") if sizes and max(sizes) > max_bytes \
                else dict(zip(names, row))


def _csv_records(piece: Piece, stats: ReadStats, fields: list[tuple[str, str]], max_bytes: int
                 ) -> Iterator[tuple[int, object]]:
    csv.field_size_limit(min(max_bytes, 2**31 - 1))  # documents are long; the default limit is 128 KiB
    # surrogateescape: a bad byte becomes a lone surrogate, reported per row instead of a codec crash; utf-8-sig
    # drops a leading BOM (it would otherwise be part of the first column's name).
    with open(piece.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        number = -1  # the header is row 0
        try:
            header = next(reader, None)
            if header is None:
                return
            _check_columns(piece.path, header, fields)
            width = len(header)
            number = 0
            for row in reader:
                number += 1
                yield from _csv_row(number, row, header, width, fields, stats)
        except csv.Error as exc:  # a field over the limit, a NUL byte, ...; the reader cannot go on past it
            where = f"{piece.path}:row {number + 1}" if number >= 0 else f"{piece.path}: header row"
            hint = (f"a field is over the {max_bytes / 2**20:g} MiB limit per record; raise --max-record-mb"
                    if "field limit" in str(exc) else f"{exc}; fix the file")
            raise DataError(f"{where}: cannot be parsed as CSV ({hint})") from None


def _csv_row(number: int, row: list, header: list, width: int, fields: list[tuple[str, str]], stats: ReadStats
             ) -> Iterator[tuple[int, object]]:
    stats.bytes_read += sum(len(v) for v in row) + len(row)
    if not row:
        return
    if len(row) != width:
        yield number, BadRecord("csv_field_count", f"row has {len(row)} fields, the header has {width}; "
                                                   "fix the row (quote fields that hold commas)")
        return
    record = dict(zip(header, row))
    for field, _ in fields:
        try:
            record[field].encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = record[field][exc.start].encode("utf-8", "surrogateescape")[0]
            yield number, BadRecord("invalid_utf8", f"field {field!r} is not valid UTF-8 (byte 0x{bad:02x}"
                                                    f" at character {exc.start + 1}); fix the row or "
                                                    "re-encode the file as UTF-8")
            break
    else:
        yield number, record


def iter_piece(piece: Piece, stats: ReadStats, fields: list[tuple[str, str]], txt_mode: str = "file",
               max_bytes: int = int(DEFAULT_MAX_RECORD_MB * 2**20)) -> Iterator[tuple[int, object]]:
    """(number within the piece, record) for every record of the piece; record: dict, str (txt) or BadRecord.
    `fields` are (field, flag) pairs the caller needs; parquet/csv files without such a column raise DataError.
    A record over `max_bytes` is a record_too_large BadRecord."""
    fmt = input_format(piece.path)
    if fmt == "jsonl":
        return _jsonl_records(piece, stats, max_bytes)
    if fmt == "txt":
        return _txt_records(piece, stats, txt_mode, max_bytes)
    if fmt == "parquet":
        return _parquet_records(piece, stats, fields, max_bytes)
    if fmt == "arrow":
        return hf_datasets.arrow_records(piece, stats, fields, max_bytes)
    return _csv_records(piece, stats, fields, max_bytes)


def location(piece: Piece, number: int) -> str:
    """'file:line' (jsonl, txt) or 'file:row N' (csv: data row, parquet: row) for record `number` of the piece."""
    fmt = input_format(piece.path)
    if fmt == "arrow":
        return hf_datasets.location(piece, number)  # DATASET['split'][row]
    if fmt == "parquet":
        start_row = 0
        if piece.end >= 0:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(piece.path).metadata
            start_row = sum(meta.row_group(g).num_rows for g in range(piece.start))
        return f"{piece.path}:row {start_row + number}"
    if fmt == "csv":
        return f"{piece.path}:row {number}"
    base = 0
    if piece.end >= 0 and piece.start > 0:  # a piece in the middle of a file: count the lines before it (rare path)
        with open(piece.path, "rb") as f:
            remaining = piece.start
            while remaining > 0 and (chunk := f.read(min(remaining, 8 << 20))):
                base += chunk.count(b"\n")
                remaining -= len(chunk)
    return f"{piece.path}:{base + number}"
