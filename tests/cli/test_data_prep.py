"""`python -m data_prep` as a user's shell runs it, one process per command: demo-corpus -> tokenizer -> tokenize ->
verify end to end, exit status 2 with one `error:` line (no traceback) for bad input, a truncated file or a full
disk, 1 from a failing verify, --on-bad-record skip, a worker or the whole command killed with SIGKILL and the
re-run resuming to byte-identical shards, and a fresh interpreter running data_prep without importing torch,
transformers or deepspeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

from data_prep.parts import PARTS_DIR
from data_prep.pipeline import tokenize_corpus
from data_prep.shards import ShardSet, load_manifest
from data_prep.workers import MIN_MB_PER_PROCESS_ENV
from tests.conftest import BAD_JSONL, NUMBERED_JSONL, PARALLEL_ARGS, ROOT, files_of, run_data_prep


def test_cli_demo_corpus_tokenizer_tokenize_verify(tmp_path):
    corpus, tok, out = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "shards"
    assert run_data_prep("demo-corpus", "--output", str(corpus), "--max-mb", "0.3").returncode == 0
    first = json.loads(corpus.read_text().splitlines()[0])
    assert set(first) == {"text"} and 300_000 <= sum(len(json.loads(line)["text"].encode())
                                                   for line in corpus.read_text().splitlines()) < 1_000_000
    assert run_data_prep("tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab-size",
                         "500").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tok"]  # no temp dir left behind
    proc = run_data_prep("tokenize", "--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tok), "--output",
                         str(out), "--val-fraction", "0.1", "--shard-tokens", "20_000", "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert "backend gigatoken" in proc.stderr and "tokenize done:" in proc.stderr
    manifest = load_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) > 1 and manifest["splits"]["val"]["num_docs"] >= 1

    proc = run_data_prep("verify", str(out))
    assert proc.returncode == 0 and proc.stdout.startswith("OK")
    shard = out / manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[11] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run_data_prep("verify", str(out))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{shard}: sha256 differs from the manifest (file changed or corrupt)"]


def test_cli_data_error_prints_message_and_exits_2(tmp_path):
    proc = run_data_prep("tokenize", "--input", str(tmp_path / "missing*.jsonl"), "--tokenizer", str(tmp_path),
                         "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: input '{tmp_path / 'missing*.jsonl'}' matches no file")
    assert "Traceback" not in proc.stderr
    proc = run_data_prep("verify", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'manifest.json'}: not found")


def test_data_prep_never_imports_torch_transformers_or_deepspeed(tiny, tmp_path):
    code = f"""
import sys
import data_prep.__main__, data_prep.backend, data_prep.demo_corpus, data_prep.manifest, data_prep.pipeline
import data_prep.readers, data_prep.shards, data_prep.splits, data_prep.train_tokenizer, data_prep.verify
import data_prep.records, data_prep.blend, data_prep.progress, data_prep.encode, data_prep.workers
import data_prep.parts, data_prep.resume_state, data_prep.assemble, data_prep.pieces, data_prep.hf_datasets
import data_prep.files, data_prep.faults
from data_prep.pipeline import tokenize_corpus
tokenize_corpus([{str(tiny["jsonl"])!r}], {str(tiny["tokenizer"])!r}, {str(tmp_path / "out")!r})
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "deepspeed"}}))
print("tqdm" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # tqdm only for a progress bar on a terminal (stderr is captured here): its import is ~50 ms of start-up.
    assert proc.stdout.split() == ["[]", "False"]


def test_cli_on_bad_record_skip(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    proc = run_data_prep("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"error: {path}:2: not valid JSON (Expecting value at column 10); fix the record or remove the line")
    proc = run_data_prep("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(tmp_path / "out"), "--on-bad-record", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 5 bad records" in proc.stderr
    assert np.sum(ShardSet(tmp_path / "out").shard_num_tokens) > 0


def test_cli_tokenize_of_a_truncated_zst_exits_2_and_writes_no_manifest(tiny, tmp_path):
    data = zstandard.ZstdCompressor().compress(NUMBERED_JSONL)
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(data[:len(data) - 10])
    proc = run_data_prep("tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}: cannot be decompressed (truncated: ")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert run_data_prep("verify", str(tmp_path / "out")).returncode != 0


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


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [k for k in kids
            if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")]


def _wait_parts(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / PARTS_DIR).glob("u*.json"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigkill_worker_then_parent_then_resume_equals_uninterrupted(tiny, parallel_corpus, tmp_path):
    paths = parallel_corpus["paths"]
    reference = tmp_path / "ref"
    tokenize_corpus(paths, tiny["tokenizer"], reference, **PARALLEL_ARGS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "tokenize", "--input", *paths, "--tokenizer",
           str(tiny["tokenizer"]), "--output", str(out), "--val-fraction", "0.1", "--test-count", "20",
           "--shard-tokens", "2000", "--workers", "2", "--chunk-mb", str(2 / 1024)]
    pool_env = {**os.environ, MIN_MB_PER_PROCESS_ENV: "0"}  # worker processes even for this small input
    env = {**pool_env, "REPARAM_FAULT_UNIT_DELAY": "0.2"}  # each unit waits after its part: time to kill
    # 1. SIGKILL one worker: the run stops with a clear error, finished parts stay
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    _wait_parts(out, 2, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(timeout=60) == 2
    assert "error: a worker process died (killed, or out of memory); re-run the same command" in proc.stderr.read()
    assert not (out / "manifest.json").exists()
    done_after_first = len(list((out / PARTS_DIR).glob("u*.json")))
    # 2. resume, then SIGKILL the parent: its workers notice and exit
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    _wait_parts(out, done_after_first + 2, proc)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert "resuming: " in proc.stderr.read()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
              for w in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.1)
    assert not (out / "manifest.json").exists()
    # 3. resume to the end: byte-identical to the uninterrupted run
    proc = subprocess.run(cmd, cwd=ROOT, env=pool_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resuming: " in proc.stderr
    assert files_of(out) == files_of(reference)
