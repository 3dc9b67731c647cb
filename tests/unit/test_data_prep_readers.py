"""data_prep.readers: input files -> raw records. Every format (jsonl, .gz, .zst, parquet, csv, txt by file or by
paragraph) round-trips, alone or mixed; inputs expand in order; a leading BOM is not text; a bad line or row, a
non-UTF-8 byte, a missing column, a damaged or truncated compressed file and a record over the size limit each stop
with `file:line: reason` (a huge line is never held whole); jsonl lines read exactly as json.loads reads them; and
a property-based check that any bytes give every record or one DataError naming the file and line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import example, given
from hypothesis import strategies as st

from data_prep.errors import DataError
from data_prep.pieces import ReadStats
from data_prep.pipeline import tokenize_corpus
from data_prep.readers import expand_inputs, plan_units
from data_prep.records import RecordSpec, iter_documents
from data_prep.shards import ShardSet
from tests.conftest import (NUMBERED_JSONL, docs_of, expected_docs, fuzz_settings, random_text,
                            read_documents, reference_ids)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(7)
    # commas, quotes and newlines exercise csv quoting; no blank lines inside a document (txt paragraph mode)
    return [random_text(rng) + (', "quoted", x' if i % 5 == 0 else "") for i in range(60)]


def write_format(path, texts, fmt):
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if fmt == "jsonl":
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=7)
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text"])
            writer.writerows([i, t] for i, t in enumerate(texts))
    elif fmt == "txt":
        path.write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "csv", "txt"])
def test_round_trip_per_format(tiny, docs, tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    write_format(path, docs, fmt)
    # 2 KiB work units: plain jsonl / paragraph txt are cut at line / blank-line boundaries, parquet by row group
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", chunk_mb=2 / 1024,
                               spec=RecordSpec(txt_mode="paragraph"))
    assert docs_of(ShardSet(tmp_path / "out")) == expected_docs(tiny, docs)
    assert manifest["counts"]["docs_read"] == 60 and manifest["splits"]["train"]["num_docs"] == 60
    if fmt in ("jsonl", "txt", "parquet"):
        assert len(plan_units([str(path)], 2048, "paragraph")) >= 3


def test_formats_mix_in_one_run_in_argument_order(tiny, docs, tmp_path):
    paths = []
    for i, fmt in enumerate(["parquet", "jsonl.zst", "csv"]):
        paths.append(tmp_path / f"p{i}.{fmt}")
        write_format(paths[-1], docs[i * 20:(i + 1) * 20], fmt)
    tokenize_corpus([str(p) for p in paths], tiny["tokenizer"], tmp_path / "out")
    assert docs_of(ShardSet(tmp_path / "out")) == expected_docs(tiny, docs)


def test_txt_file_mode_is_one_document_per_file_paragraph_mode_splits_blocks(tiny, tmp_path):
    (tmp_path / "a.txt").write_text("first block\nline two\n\n  \nsecond block\n\n\nthird\n", encoding="utf-8")
    tokenize_corpus([str(tmp_path / "a.txt")], tiny["tokenizer"], tmp_path / "file")
    assert docs_of(ShardSet(tmp_path / "file")) == expected_docs(tiny, [(tmp_path / "a.txt").read_text()])
    tokenize_corpus([str(tmp_path / "a.txt")], tiny["tokenizer"], tmp_path / "para",
                    spec=RecordSpec(txt_mode="paragraph"))
    assert docs_of(ShardSet(tmp_path / "para")) == expected_docs(tiny, ["first block\nline two", "second block",
                                                                         "third"])


def test_inputs_expand_in_order_and_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.txt", "sub/a.txt", "skip.xlsx"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert expand_inputs([str(tmp_path / "sub"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]) == [
        str(tmp_path / "sub/a.txt"), str(tmp_path / "sub/c.txt"), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_unmatched_glob_and_unsupported_file(tmp_path):
    pattern = str(tmp_path / "nothing*.jsonl")
    with pytest.raises(DataError) as info:
        expand_inputs([pattern])
    assert str(info.value).startswith(f"input {pattern!r} matches no file;")
    (tmp_path / "x.xlsx").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.xlsx: unsupported input type; use \.jsonl/\.jsonl\.gz/\.jsonl\.zst, "
                                        r"\.parquet, \.csv or \.txt"):
        expand_inputs([str(tmp_path / "x.xlsx")])


def test_a_bom_at_the_start_of_an_input_is_not_text(tiny, tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "a.txt").write_bytes(bom + "héllo\n\nworld\n".encode())
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "c.csv").write_bytes(bom + b"text,id\ncsv row,1\n")
    docs = [d.text for d in iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                                            str(tmp_path / "c.csv")])]
    assert docs == ["héllo\n\nworld\n", "first", "second", "csv row"]
    paragraphs = [d.text for d in iter_documents([str(tmp_path / "a.txt")], txt_mode="paragraph")]
    assert paragraphs == ["héllo", "world"]
    out = tmp_path / "out"
    tokenize_corpus([str(tmp_path / "a.txt")], tiny["tokenizer"], out)
    assert docs_of(ShardSet(out)) == [reference_ids(tiny["hf"], ["héllo\n\nworld\n"])[0] + [0]]


def test_jsonl_records_are_exactly_what_json_loads_reads(tmp_path):
    """orjson reads the lines; wherever it could differ from json.loads the line is read by json.loads instead."""
    from data_prep.pieces import BadRecord, Piece, ReadStats
    from data_prep.readers import iter_piece

    lines = [b'{"text": "plain", "label": 3}', b'{"text": "\\ud83d\\ude00 pair", "n": -0.0}',
             b'{"text": "lone \\ud800 surrogate"}', b'{"text": "x", "score": NaN}', b'{"text": "x", "big": 1e400}',
             b'{"text": "y", "label": 123456789012345678901234567890}', b'{"text": "z", "f": 1e20}',
             b'{"text": "dup", "text": "last"}', b'   ', b'[1, 2]', b'\xef\xbb\xbf{"text": "bom"}',
             b'{"text": "bad \xff utf-8"}', b'{"text": "trailing"} x', b'  {"text": "spaces"}  ', b'{"t": "\\u0000"}']
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = {n: r for n, r in iter_piece(Piece(str(path), 0, -1), ReadStats(), [("text", "--text-field")])}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            assert number not in got  # blank lines are not records
            continue
        try:
            want = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            assert isinstance(got[number], BadRecord) and got[number].reason in ("invalid_json", "invalid_utf8")
            continue
        if not isinstance(want, dict):
            assert isinstance(got[number], BadRecord) and got[number].reason == "not_an_object"
            continue
        assert repr(got[number]) == repr(want)  # repr: NaN == NaN, and int vs float tell apart
        assert [type(v) for v in got[number].values()] == [type(v) for v in want.values()]


# -------------------------------------------------------------------------------------------------- bad lines and rows


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError) as info:
        read_documents([str(path)])
    assert str(info.value) == (f"{path}:2: not valid JSON (Expecting value at column 10); "
                               "fix the record or remove the line")


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_documents([str(path)])
    assert str(info.value) == (f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14); fix the record or re-encode "
                               "the file as UTF-8")
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"line one\nline two\nbad \xff here\n")
    with pytest.raises(DataError, match=r"d\.txt:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        read_documents([str(txt)])


def test_parquet_and_csv_bad_rows_name_the_row(tiny, tmp_path):
    pq.write_table(pa.table({"text": ["ok", "fine", None, "good"]}), tmp_path / "d.parquet", row_group_size=2)
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "d.parquet")], tiny["tokenizer"], tmp_path / "o1", chunk_mb=1e-6)
    assert str(info.value) == (f"{tmp_path / 'd.parquet'}:row 3: field 'text' is a JSON null, not a string; fix the "
                               "record or pass --text-field with the field that holds the text (now 'text')")
    manifest = tokenize_corpus([str(tmp_path / "d.parquet")], tiny["tokenizer"], tmp_path / "o2",
                               spec=RecordSpec(on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"not_a_string": 1}
    assert docs_of(ShardSet(tmp_path / "o2")) == expected_docs(tiny, ["ok", "fine", "good"])

    (tmp_path / "e.csv").write_bytes(b'text,id\n"hello, there",1\nbad \xff byte,2\nthree,fields,here\nlast,4\n')
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "e.csv")], tiny["tokenizer"], tmp_path / "o3")
    assert str(info.value) == (f"{tmp_path / 'e.csv'}:row 2: field 'text' is not valid UTF-8 (byte 0xff at "
                               "character 5); fix the row or re-encode the file as UTF-8")
    manifest = tokenize_corpus([str(tmp_path / "e.csv")], tiny["tokenizer"], tmp_path / "o4",
                               spec=RecordSpec(on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"csv_field_count": 1, "invalid_utf8": 1}
    assert docs_of(ShardSet(tmp_path / "o4")) == expected_docs(tiny, ["hello, there", "last"])


def test_missing_column_stops_even_when_skipping(tiny, tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "d.parquet")], tiny["tokenizer"], tmp_path / "out",
                        spec=RecordSpec(on_bad="skip"))
    assert str(info.value) == (f"{tmp_path / 'd.parquet'}: no column 'text' (columns: 'body', 'id'); pass "
                               "--text-field with the column that holds it")


def test_damaged_gzip_is_reported(tiny, tmp_path):
    data = gzip.compress(b'{"text": "x"}\n' * 1000)
    (tmp_path / "c.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"c\.jsonl\.gz: cannot be decompressed \(.*\); the file is damaged"):
        tokenize_corpus([str(tmp_path / "c.jsonl.gz")], tiny["tokenizer"], tmp_path / "out")


# ------------------------------------------------------------------------------ damaged and truncated compressed files


def truncated_message(path) -> str:
    return f"{path}: cannot be decompressed (truncated: "


def test_zst_cut_anywhere_inside_a_frame_is_truncated(tiny, tmp_path):
    data = zstandard.ZstdCompressor(level=1).compress(NUMBERED_JSONL)
    # Cuts in the frame header, in the block headers, mid-block and just before the end: all of them are errors.
    for cut in sorted({1, 4, 5, 6, 9, 12, len(data) // 3, len(data) // 2, len(data) - 5, len(data) - 1}):
        path = tmp_path / f"c{cut}.jsonl.zst"
        path.write_bytes(data[:cut])
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / f"out{cut}")
        assert str(err.value).startswith(truncated_message(path)), (cut, str(err.value))
        assert "the file ends inside a zstd frame" in str(err.value)


def test_zst_cut_at_a_block_boundary_is_truncated_and_multiframe_files_read_whole(tiny, tmp_path):
    # A streaming compressor writes several blocks per frame; cutting after a complete block leaves a frame without
    # its last block, which the stream reader would take for the end of the data.
    cctx = zstandard.ZstdCompressor(level=1)
    big = NUMBERED_JSONL * 20  # > 128 KiB: several blocks
    data = cctx.compress(big)
    header_end = 4 + 1 + 1 + 4  # magic, descriptor, window, 4-byte content size (level 1, known size)
    first_block = int.from_bytes(data[header_end:header_end + 3], "little") >> 3
    assert not data[header_end] & 1  # not the last block
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[:header_end + 3 + first_block])
    with pytest.raises(DataError, match="truncated: the file ends inside a zstd frame"):
        list(iter_documents([str(path)]))
    two = tmp_path / "two.jsonl.zst"
    half = len(NUMBERED_JSONL) // 2
    two.write_bytes(cctx.compress(NUMBERED_JSONL[:half]) + cctx.compress(NUMBERED_JSONL[half:]))
    assert len(list(iter_documents([str(two)]))) == 3000


def test_gz_cut_mid_line_is_truncated_not_invalid_json(tiny, tmp_path):
    data = gzip.compress(NUMBERED_JSONL)
    for cut in (len(data) // 2, len(data) - 3):
        path = tmp_path / f"c{cut}.jsonl.gz"
        path.write_bytes(data[:cut])
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / f"out{cut}")
        assert str(err.value).startswith(truncated_message(path)), str(err.value)


# --------------------------------------------------------------------------------------------------------- record size


def test_a_record_over_the_limit_is_refused_with_file_line_size_limit_and_flag(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": "x" * 300_000}) + "\n"
                    + json.dumps({"text": "after"}) + "\n")
    spec = RecordSpec(max_record_mb=0.25)
    with pytest.raises(DataError) as err:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", spec=spec)
    assert str(err.value) == (f"{path}:2: line is 0.3 MiB, over the 0.25 MiB limit per record; split the document, "
                              "raise --max-record-mb (tokenizing a record takes ~150x its size in memory) or pass "
                              "--on-bad-record skip")
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "skip",
                               spec=RecordSpec(max_record_mb=0.25, on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"record_too_large": 1}
    assert docs_of(ShardSet(tmp_path / "skip")) == [ids + [0] for ids in reference_ids(tiny["hf"],
                                                                                       ["small", "after"])]
    assert tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "raised",
                           spec=RecordSpec(max_record_mb=1))["splits"]["train"]["num_docs"] == 3


@pytest.mark.parametrize("fmt", ["txt-file", "txt-paragraph", "csv", "parquet", "jsonl.zst"])
def test_record_limit_in_every_format(tiny, tmp_path, fmt):
    big = "word " * 60_000  # 300,000 bytes
    txt_mode = "paragraph" if fmt == "txt-paragraph" else "file"
    if fmt.startswith("txt"):
        path = tmp_path / "c.txt"
        path.write_text("small\n\n" + big.replace(" ", "\n", 1000) + "\n\nafter\n" if txt_mode == "paragraph"
                        else big)
        where, what = (f"{path}:3: paragraph", "0.3") if txt_mode == "paragraph" else (
            f"{path}:1: the file (one document with --txt-mode file; --txt-mode paragraph reads one per blank-line "
            "block)", "0.3")
    elif fmt == "csv":
        path = tmp_path / "c.csv"
        path.write_text(f"text\nsmall\n{big}\n")
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", spec=RecordSpec(max_record_mb=0.25))
        assert str(err.value) == (f"{path}:row 2: cannot be parsed as CSV (a field is over the 0.25 MiB limit per "
                                  "record; raise --max-record-mb)")
        return
    elif fmt == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": ["small", big]}), path)
        where, what = f"{path}:row 2: a value", "0.3"
    else:
        path = tmp_path / "c.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(
            (json.dumps({"text": "small"}) + "\n" + json.dumps({"text": big}) + "\n").encode()))
        where, what = f"{path}:2: line", "0.3"
    with pytest.raises(DataError) as err:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out",
                        spec=RecordSpec(max_record_mb=0.25, txt_mode=txt_mode))
    assert str(err.value).startswith(f"{where} is {what} MiB, over the 0.25 MiB limit per record; "), str(err.value)


def test_a_huge_line_is_never_held_whole(tmp_path):
    import tracemalloc

    path = tmp_path / "c.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        for _ in range(40):
            f.write(b"x" * (1 << 20))  # 40 MiB on one line, no newline anywhere
        f.write(b'"}')
    tracemalloc.start()
    stats = ReadStats()
    with pytest.raises(DataError, match=r"c\.jsonl:1: line is 40\.0 MiB, over the 1 MiB limit per record"):
        list(iter_documents([str(path)], stats=stats, max_record_mb=1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak


# ----------------------------------------------------------------------------------------------------------- any input


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3)), max_leaves=8)
records = st.dictionaries(st.sampled_from(["text", "id", "other"]), json_values, max_size=3)
json_lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
              st.text(max_size=30)),
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"   ", b"\xef\xbb\xbf{\"text\": \"bom\"}", b"[" * 5000 + b"]" * 5000,
                     b'{"text": "a", "text": 1}', b"NaN", b'{"text": "x", "n": 1e400}']),
).map(lambda b: b.replace(b"\n", b" "))


def _blank(line: bytes, first: bool) -> bool:
    if first and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@fuzz_settings
@given(lines=st.lists(json_lines, max_size=8), trailing_newline=st.booleans())
@example(lines=[b'{"text": "ok"}', b"[" * 100_000], trailing_newline=True)
def test_jsonl_reader_reads_everything_or_names_file_and_line(scratch, lines, trailing_newline):
    path = scratch / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline and lines else b""))
    stats = ReadStats()
    try:
        docs = list(iter_documents([str(path)], stats=stats))
    except DataError as exc:
        match = re.match(rf"{re.escape(str(path))}:(\d+): ", str(exc))
        assert match and 1 <= int(match.group(1)) <= len(lines), str(exc)
        return
    expected = sum(not _blank(line, i == 0) for i, line in enumerate(lines))
    assert stats.docs_read == expected  # nothing silently dropped
    assert len(docs) == stats.docs_read - stats.docs_empty_dropped
    assert all(d.line >= 1 and d.source == str(path) for d in docs)


csv_cells = st.one_of(st.text(max_size=15), st.sampled_from(['"', '""', ",", "\n", "\r\n", "\x00", "a\"b", "\ufeff"]))


@fuzz_settings
@given(rows=st.lists(st.lists(csv_cells, max_size=3), max_size=6), raw=st.booleans(), junk=st.binary(max_size=20))
def test_csv_reader_reads_everything_or_names_file_and_row(scratch, rows, raw, junk):
    path = scratch / "fuzz.csv"
    if raw:  # arbitrary text joined without quoting, plus arbitrary bytes
        data = "\n".join(",".join(r) for r in [["text", "id"]] + rows).encode("utf-8", "surrogatepass") + junk
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["text", "id"]] + rows)
        data = buffer.getvalue().encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    stats = ReadStats()
    try:
        docs = list(iter_documents([str(path)], stats=stats))
    except DataError as exc:
        assert re.match(rf"{re.escape(str(path))}(:row \d+|: header row)?: ", str(exc)), str(exc)
        return
    # Oracle: the csv module over the same text; every data row that is not blank is a record.
    text = data.decode("utf-8-sig", "surrogateescape")
    expected = sum(1 for row in list(csv.reader(io.StringIO(text, newline="")))[1:] if row)
    assert stats.docs_read == expected
    assert len(docs) == stats.docs_read - stats.docs_empty_dropped
