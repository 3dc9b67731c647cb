"""data_prep hardening: truncated compressed inputs, resume after an input was edited in place, bounded labels,
bounded memory per record, the tokenizer fingerprint over tokenizer files only, disk full, BOMs."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.errors import DataError
from data_prep.manifest import tokenizer_fingerprint
from data_prep.pipeline import tokenize_corpus
from data_prep.pieces import ReadStats
from data_prep.records import RecordSpec, iter_documents
from data_prep.shards import ShardSet
from tests.unit.test_data_prep import ROOT, docs_of, reference_ids, run_cli, tiny  # noqa: F401 (fixture)

LINES = b"".join(json.dumps({"text": f"document {i} alpha beta gamma"}).encode() + b"\n" for i in range(3000))


def truncated_message(path) -> str:
    return f"{path}: cannot be decompressed (truncated: "


# ---------------------------------------------------------------------------------------------- truncated inputs


def test_zst_cut_anywhere_inside_a_frame_is_truncated(tiny, tmp_path):
    data = zstandard.ZstdCompressor(level=1).compress(LINES)
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
    big = LINES * 20  # > 128 KiB: several blocks
    data = cctx.compress(big)
    header_end = 4 + 1 + 1 + 4  # magic, descriptor, window, 4-byte content size (level 1, known size)
    first_block = int.from_bytes(data[header_end:header_end + 3], "little") >> 3
    assert not data[header_end] & 1  # not the last block
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[:header_end + 3 + first_block])
    with pytest.raises(DataError, match="truncated: the file ends inside a zstd frame"):
        list(iter_documents([str(path)]))
    two = tmp_path / "two.jsonl.zst"
    two.write_bytes(cctx.compress(LINES[:len(LINES) // 2]) + cctx.compress(LINES[len(LINES) // 2:]))
    assert len(list(iter_documents([str(two)]))) == 3000


def test_gz_cut_mid_line_is_truncated_not_invalid_json(tiny, tmp_path):
    data = gzip.compress(LINES)
    for cut in (len(data) // 2, len(data) - 3):
        path = tmp_path / f"c{cut}.jsonl.gz"
        path.write_bytes(data[:cut])
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / f"out{cut}")
        assert str(err.value).startswith(truncated_message(path)), str(err.value)


def test_cli_tokenize_of_a_truncated_zst_exits_2_and_writes_no_manifest(tiny, tmp_path):
    data = zstandard.ZstdCompressor().compress(LINES)
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(data[:len(data) - 10])
    proc = run_cli("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                   str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}: cannot be decompressed (truncated: ")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert run_cli("verify", str(tmp_path / "out")).returncode != 0


# ---------------------------------------------------------------------------------------------- resume


def _edit_in_place(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    before = os.stat(path).st_mtime_ns
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))  # coarse-mtime file systems


def test_resume_after_an_input_was_edited_in_place_does_not_reuse_stale_parts(tiny, tmp_path, capfd):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"".join(json.dumps({"text": f"doc {i:03d} alpha beta"}).encode() + b"\n" for i in range(40)))
    out = tmp_path / "out"
    kw = dict(chunk_mb=200 / 2**20)  # ~200-byte units: several parts
    assert tokenize_corpus([str(corpus)], tiny["tokenizer"], out, num_tasks=2, task_id=0, **kw) is None
    _edit_in_place(corpus, b"doc 001 alpha", b"doc 001 gamma")
    # Another task of the array job: refuses, naming the input and what to do.
    with pytest.raises(DataError) as err:
        tokenize_corpus([str(corpus)], tiny["tokenizer"], out, num_tasks=2, task_id=1, **kw)
    assert str(err.value) == (f"{out / '.parts'}: holds parts of a different run (input {corpus} changed (size or "
                              f"modification time) since they were written); remove {out / '.parts'} and re-run "
                              "every task of the array job")
    # A single-task re-run starts over (says why) and its shards are those of the edited input.
    capfd.readouterr()
    tokenize_corpus([str(corpus)], tiny["tokenizer"], out, **kw)
    assert (f"data_prep: {out / '.parts'}: parts of a different run found (input {corpus} changed (size or "
            "modification time) since they were written); starting over") in capfd.readouterr().err
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert docs_of(ShardSet(out)) == [ids + [0] for ids in reference_ids(tiny["hf"], texts)]
    # A finished output is not "nothing to do" for an input edited after it at the same size.
    _edit_in_place(corpus, b"doc 002 alpha", b"doc 002 delta")
    tokenize_corpus([str(corpus)], tiny["tokenizer"], out, **kw)
    assert "nothing to do" not in capfd.readouterr().err
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert docs_of(ShardSet(out)) == [ids + [0] for ids in reference_ids(tiny["hf"], texts)]


# ---------------------------------------------------------------------------------------------- labels


def _labelled(tmp_path, labels, name="c.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": f"text {i}"})[:-1] + f', "label": {label}}}\n'
                            for i, label in enumerate(labels)))
    return path


def test_undeclared_integer_labels_are_bounded(tiny, tmp_path):
    spec = RecordSpec(kind="classification")
    for raw, message in [
        ("100000000", "label 100000000 is too large: integer labels are class ids, 100,000,001 classes without "
                      "--num-labels or --labels (the limit is 10,000); fix the record or declare the classes with "
                      "--num-labels N"),
        ("100000000000000000000000", "label 100000000000000000000000 is too large"),
        ("1e23", "label field 'label' is a JSON number, not a string or a non-negative integer; fix the record"),
    ]:
        path = _labelled(tmp_path, ["0", "1", raw], f"c{len(raw)}.jsonl")
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / f"out{len(raw)}", spec=spec)
        assert str(err.value).startswith(f"{path}:3: {message}"), str(err.value)
    path = _labelled(tmp_path, ["0", "9999"], "ok.jsonl")
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "ok", spec=spec)
    assert manifest["classification"]["num_labels"] == 10_000


def test_num_labels_declares_the_classes(tiny, tmp_path):
    path = _labelled(tmp_path, ["0", "2", "1"])
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(kind="classification", num_labels=5))
    cls = manifest["classification"]
    assert (cls["labels"], cls["num_labels"], cls["label_counts"]["train"]) == ([0, 1, 2, 3, 4], 5, [1, 1, 1, 0, 0])
    with pytest.raises(DataError) as err:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "o2",
                        spec=RecordSpec(kind="classification", num_labels=2))
    assert str(err.value) == (f"{path}:2: label 2 is not an integer in [0, --num-labels 2); fix the record or raise "
                              "--num-labels (or name string labels with --labels)")
    with pytest.raises(DataError, match=r"--num-labels 0: must be in \[1, 1,000,000\]"):
        RecordSpec(kind="classification", num_labels=0).validate()


def test_empty_label_names_are_refused(tiny, tmp_path):
    with pytest.raises(DataError) as err:
        RecordSpec(kind="classification", labels=("yes", "", "maybe")).validate()
    assert str(err.value) == ("--labels: label 2 of 3 is empty; list the label names separated by commas, e.g. "
                              "--labels neg,neutral,pos")
    path = _labelled(tmp_path, ['"yes"'])
    for labels in ("yes,,maybe", ""):
        proc = run_cli("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                       str(tmp_path / "out"), "--record-kind", "classification", "--labels", labels)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --labels: label "), proc.stderr


# ---------------------------------------------------------------------------------------------- record size


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


# ---------------------------------------------------------------------------------------------- fingerprint


def _legacy_fingerprint(directory) -> str:
    """The fingerprint before it was limited to tokenizer files: every file of the directory."""
    digest = hashlib.sha256()
    for name, path in sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def test_fingerprint_covers_tokenizer_files_only_and_never_reads_a_stray_file(tiny, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], copy)
    original = tokenizer_fingerprint(copy)
    assert original == _legacy_fingerprint(tiny["tokenizer"])  # manifests written before the change still match
    with open(copy / "model.safetensors", "wb") as f:  # a sparse 1.5 GB stray file
        f.truncate(1_500_000_000)
    (copy / "notes.txt").write_text("hello")
    start = time.perf_counter()
    assert tokenizer_fingerprint(copy) == original
    assert time.perf_counter() - start < 1.0
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    with_template = tokenizer_fingerprint(copy)
    assert with_template != original
    (copy / "additional_chat_templates").mkdir()
    (copy / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")
    assert tokenizer_fingerprint(copy) not in (original, with_template)


# ---------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("full_at", [".train_", ".u000001."], ids=["first_shard", "second_part"])
def test_disk_full_leaves_nothing_half_written_and_the_rerun_resumes(tiny, tmp_path, monkeypatch, capfd, full_at):
    out = tmp_path / "out"
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the first shard, or the second unit's part, is written
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(full_at):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, chunk_mb=2 / 1024)
    assert err.value.errno == errno.ENOSPC
    assert not (out / "manifest.json").exists()
    left = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert left == [] and not list(out.glob("*.bin")), left
    monkeypatch.setattr(os, "fsync", real_fsync)
    capfd.readouterr()
    manifest = tokenize_corpus([str(tiny["jsonl"])], tiny["tokenizer"], out, chunk_mb=2 / 1024)
    assert "units already done" in capfd.readouterr().err
    assert manifest["splits"]["train"]["num_docs"] == 120


def test_disk_full_in_the_cli_is_one_error_line(tiny, tmp_path):
    out = tmp_path / "out"
    code = ("import errno, runpy, sys, data_prep.shards as s\n"
            "def add(*a, **k):\n"
            f"    raise OSError(errno.ENOSPC, 'No space left on device', {str(out / 'train_00000.bin')!r})\n"
            "s.ShardWriter.add = add\n"
            f"sys.argv = ['data_prep', 'tokenize', '--input', {str(tiny['jsonl'])!r}, '--tokenizer', "
            f"{str(tiny['tokenizer'])!r}, '--output', {str(out)!r}]\n"
            "runpy.run_module('data_prep', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no space left on device writing {out / 'train_00000.bin'} (No space left on device); nothing "
        "half-written was left: free space or choose another output, then re-run the same command (finished work "
        "is kept)")
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------- BOM


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
