"""data_prep input formats (jsonl/.gz/.zst, parquet, csv, txt file/paragraph), text-field flags, bad records."""

from __future__ import annotations

import csv
import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.readers import plan_units
from data_prep.records import RecordSpec
from data_prep.shards import ShardSet
from tests.unit.test_data_prep import docs_of, random_text, reference_ids, run_cli, tiny  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(7)
    # commas, quotes and newlines exercise csv quoting; no blank lines inside a document (txt paragraph mode)
    return [random_text(rng) + (', "quoted", x' if i % 5 == 0 else "") for i in range(60)]


def expected(tiny, texts):
    return [ids + [0] for ids in reference_ids(tiny["hf"], texts)]


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


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "csv", "txt"])
def test_round_trip_per_format(tiny, docs, tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    write_format(path, docs, fmt)
    # 2 KiB work units: plain jsonl / paragraph txt are cut at line / blank-line boundaries, parquet by row group
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", chunk_mb=2 / 1024,
                               spec=RecordSpec(txt_mode="paragraph"))
    assert docs_of(ShardSet(tmp_path / "out")) == expected(tiny, docs)
    assert manifest["counts"]["docs_read"] == 60 and manifest["splits"]["train"]["num_docs"] == 60
    if fmt in ("jsonl", "txt", "parquet"):
        assert len(plan_units([str(path)], 2048, "paragraph")) >= 3


def test_formats_mix_in_one_run_in_argument_order(tiny, docs, tmp_path):
    paths = []
    for i, fmt in enumerate(["parquet", "jsonl.zst", "csv"]):
        paths.append(tmp_path / f"p{i}.{fmt}")
        write_format(paths[-1], docs[i * 20:(i + 1) * 20], fmt)
    tokenize_corpus([str(p) for p in paths], tiny["tokenizer"], tmp_path / "out")
    assert docs_of(ShardSet(tmp_path / "out")) == expected(tiny, docs)


def test_txt_file_mode_is_one_document_per_file_paragraph_mode_splits_blocks(tiny, tmp_path):
    (tmp_path / "a.txt").write_text("first block\nline two\n\n  \nsecond block\n\n\nthird\n", encoding="utf-8")
    tokenize_corpus([str(tmp_path / "a.txt")], tiny["tokenizer"], tmp_path / "file")
    assert docs_of(ShardSet(tmp_path / "file")) == expected(tiny, [(tmp_path / "a.txt").read_text()])
    tokenize_corpus([str(tmp_path / "a.txt")], tiny["tokenizer"], tmp_path / "para",
                    spec=RecordSpec(txt_mode="paragraph"))
    assert docs_of(ShardSet(tmp_path / "para")) == expected(tiny, ["first block\nline two", "second block", "third"])


def test_several_text_fields_are_joined(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"title": "alpha", "body": "beta gamma"}\n{"title": "delta", "body": "token"}\n')
    spec = RecordSpec(text_fields=("title", "body"), field_join=" | ")
    tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", spec=spec)
    assert docs_of(ShardSet(tmp_path / "out")) == expected(tiny, ["alpha | beta gamma", "delta | token"])
    proc = run_cli("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                   str(tmp_path / "cli"), "--text-field", "title", "--text-field", "body", "--field-join", " | ")
    assert proc.returncode == 0, proc.stderr
    assert docs_of(ShardSet(tmp_path / "cli")) == docs_of(ShardSet(tmp_path / "out"))


BAD_JSONL = (b'{"text": "good one"}\n'
             b'{"text": broken}\n'  # 2 invalid_json
             b'["text"]\n'  # 3 not_an_object
             b'{"body": "x"}\n'  # 4 missing_field
             b'{"text": 12}\n'  # 5 not_a_string
             b'{"text": "caf\xe9"}\n'  # 6 invalid_utf8
             b'{"text": "   "}\n'  # 7 empty: dropped, not bad
             b'\n'  # blank line: not a record
             b'{"text": "good two"}\n')


def test_skip_counts_bad_records_by_reason(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(on_bad="skip"), chunk_mb=40 / 2**20)  # ~40-byte units
    assert manifest["counts"] == {"docs_read": 8, "docs_empty_dropped": 1, "bytes_read": len(BAD_JSONL),
                                  "bad_records": {"invalid_json": 1, "invalid_utf8": 1, "missing_field": 1,
                                                  "not_a_string": 1, "not_an_object": 1}}
    assert docs_of(ShardSet(tmp_path / "out")) == expected(tiny, ["good one", "good two"])


@pytest.mark.parametrize("line, message", [
    (2, "not valid JSON (Expecting value at column 10); fix the record or remove the line"),
    (3, "record is a JSON array, not an object; fix the record or remove the line"),
    (4, "record has no field 'text' (fields: 'body'); fix the record or pass --text-field with the field that "
        "holds the text (now 'text')"),
    (5, "field 'text' is a JSON number, not a string; fix the record or pass --text-field with the field that "
        "holds the text (now 'text')"),
    (6, "not valid UTF-8 (byte 0xe9 at column 14); fix the record or re-encode the file as UTF-8"),
])
def test_default_stops_at_first_bad_record_with_file_line_and_reason(tiny, tmp_path, line, message, monkeypatch):
    monkeypatch.setenv("DATA_PREP_MIN_MB_PER_PROCESS", "0")  # worker processes even for this tiny input
    lines = BAD_JSONL.split(b"\n")
    path = tmp_path / "bad.jsonl"
    # keep only the line under test bad, after 30 good lines, and cut the file into tiny units: the line number
    # is still the line in the file, not in the unit
    path.write_bytes(b'{"text": "good"}\n' * 30 + lines[0] + b"\n" + lines[line - 1] + b"\n" + lines[-1])
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", chunk_mb=100 / 2**20,
                        workers=2 if line == 2 else 1)
    assert str(info.value) == f"{path}:{30 + 2}: {message}"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_parquet_and_csv_bad_rows_name_the_row(tiny, tmp_path):
    pq.write_table(pa.table({"text": ["ok", "fine", None, "good"]}), tmp_path / "d.parquet", row_group_size=2)
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "d.parquet")], tiny["tokenizer"], tmp_path / "o1", chunk_mb=1e-6)
    assert str(info.value) == (f"{tmp_path / 'd.parquet'}:row 3: field 'text' is a JSON null, not a string; fix the "
                               "record or pass --text-field with the field that holds the text (now 'text')")
    manifest = tokenize_corpus([str(tmp_path / "d.parquet")], tiny["tokenizer"], tmp_path / "o2",
                               spec=RecordSpec(on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"not_a_string": 1}
    assert docs_of(ShardSet(tmp_path / "o2")) == expected(tiny, ["ok", "fine", "good"])

    (tmp_path / "e.csv").write_bytes(b'text,id\n"hello, there",1\nbad \xff byte,2\nthree,fields,here\nlast,4\n')
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "e.csv")], tiny["tokenizer"], tmp_path / "o3")
    assert str(info.value) == (f"{tmp_path / 'e.csv'}:row 2: field 'text' is not valid UTF-8 (byte 0xff at "
                               "character 5); fix the row or re-encode the file as UTF-8")
    manifest = tokenize_corpus([str(tmp_path / "e.csv")], tiny["tokenizer"], tmp_path / "o4",
                               spec=RecordSpec(on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"csv_field_count": 1, "invalid_utf8": 1}
    assert docs_of(ShardSet(tmp_path / "o4")) == expected(tiny, ["hello, there", "last"])


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


def test_cli_on_bad_record_skip(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    proc = run_cli("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                   str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"error: {path}:2: not valid JSON (Expecting value at column 10); fix the record or remove the line")
    proc = run_cli("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                   str(tmp_path / "out"), "--on-bad-record", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 5 bad records" in proc.stderr
    assert np.sum(ShardSet(tmp_path / "out").shard_num_tokens) > 0


def test_progress_logs_rates_and_eta_when_not_a_tty(monkeypatch, capsys):
    import re

    from data_prep import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.Progress("tokenize", total=4_000_000)
    bar.advance(10, 1_000_000, 5_000)
    err = capsys.readouterr().err
    assert re.fullmatch(r"data_prep: tokenize: 10 docs \([\d,]+/s\), 5,000 tokens \([\d,]+/s\), 1\.0 MB "
                        r"\([\d.]+ MB/s\), ETA \d+ s\n", err), err


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
