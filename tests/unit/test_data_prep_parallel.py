"""data_prep determinism across workers/chunks/backends, resume after kills, idempotent re-runs, array tasks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.errors import DataError
from data_prep.parts import PARTS_DIR
from data_prep.pipeline import auto_chunk_bytes, merge, tokenize_corpus
from data_prep.shards import ShardSet
from data_prep.workers import MIN_MB_PER_PROCESS_ENV
from tests.unit.test_data_prep import ROOT, docs_of, random_text, reference_ids, run_cli, tiny  # noqa: F401


@pytest.fixture(autouse=True)
def worker_processes_even_for_tiny_inputs(monkeypatch):
    monkeypatch.setenv(MIN_MB_PER_PROCESS_ENV, "0")  # else --workers N runs small inputs in-process


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(600)]
    paths = []
    for k in range(3):  # three files: a unit may span file boundaries
        paths.append(root / f"part{k}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k * 200:(k + 1) * 200]))
    return {"paths": [str(p) for p in paths], "texts": texts}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


ARGS = dict(val_fraction=0.1, test_count=20, shard_tokens=2_000)


def test_default_unit_size_is_a_sixteenth_of_the_input_within_1_to_16_mib():
    mib = 1 << 20
    assert auto_chunk_bytes(0) == auto_chunk_bytes(16 * mib) == mib  # up to 16 MiB of input: 1 MiB units
    assert auto_chunk_bytes(72 * mib) == 72 * mib // 16  # the benchmark's corpus: 16 units of 4.5 MiB
    assert auto_chunk_bytes(10_000 * mib) == 16 * mib


def test_output_is_byte_identical_for_any_workers_chunks_batches(tiny, corpus, tmp_path):
    reference = tokenize_corpus(corpus["paths"], tiny["tokenizer"], tmp_path / "a", **ARGS)
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], tmp_path / "b", workers=2, chunk_mb=3 / 1024, batch_size=5,
                    **ARGS)
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], tmp_path / "c", workers=3, chunk_mb=1 / 1024, **ARGS)
    os.environ.pop(MIN_MB_PER_PROCESS_ENV)
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], tmp_path / "d", workers=2, **ARGS)  # in-process: small input
    a = files_of(tmp_path / "a")
    assert a == files_of(tmp_path / "b") == files_of(tmp_path / "c") == files_of(tmp_path / "d")
    assert not (tmp_path / "b" / PARTS_DIR).exists()
    assert [reference["splits"][s]["num_docs"] for s in ("train", "val", "test")] == [517, 63, 20]
    ids = [i + [0] for i in reference_ids(tiny["hf"], corpus["texts"])]
    got = sorted(d for s in ("train", "val", "test") for d in docs_of(ShardSet(tmp_path / "a", s)))
    assert got == sorted(ids)


def test_backends_give_identical_shards(tiny, corpus, tmp_path):
    m1 = tokenize_corpus(corpus["paths"][:1], tiny["tokenizer"], tmp_path / "g", workers=2, chunk_mb=2 / 1024,
                         backend="gigatoken")
    m2 = tokenize_corpus(corpus["paths"][:1], tiny["tokenizer"], tmp_path / "t", backend="tokenizers")
    assert (m1["tokenizer"]["backend"], m2["tokenizer"]["backend"]) == ("gigatoken", "tokenizers")
    g, t = files_of(tmp_path / "g"), files_of(tmp_path / "t")
    assert {k: v for k, v in g.items() if k != "manifest.json"} == {k: v for k, v in t.items() if k != "manifest.json"}
    m2["tokenizer"]["backend"] = "gigatoken"
    assert m1 == m2  # the manifests differ only in the backend they record


def test_finished_run_rerun_does_nothing_and_says_so(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], out, **ARGS)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], out, workers=2, **ARGS)  # workers do not change the output
    assert "nothing to do: " in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], out, val_fraction=0.2, shard_tokens=2_000)  # other args
    assert "nothing to do" not in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["val_fraction"] == 0.2


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [k for k in kids if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")]


def _wait_parts(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / PARTS_DIR).glob("u*.json"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigkill_worker_then_parent_then_resume_equals_uninterrupted(tiny, corpus, tmp_path):
    reference = tmp_path / "ref"
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], reference, **ARGS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "tokenize", "--input", *corpus["paths"], "--tokenizer",
           str(tiny["tokenizer"]), "--output", str(out), "--val-fraction", "0.1", "--test-count", "20",
           "--shard-tokens", "2000", "--workers", "2", "--chunk-mb", str(2 / 1024)]
    env = {**os.environ, "REPARAM_FAULT_UNIT_DELAY": "0.2"}  # each unit waits after its part: time to kill
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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resuming: " in proc.stderr
    assert files_of(out) == files_of(reference)


def test_array_tasks_merged_equal_single_run(tiny, corpus, tmp_path):
    tokenize_corpus(corpus["paths"], tiny["tokenizer"], tmp_path / "single", **ARGS)
    out = tmp_path / "tasks"
    for task in (2, 0):
        assert tokenize_corpus(corpus["paths"], tiny["tokenizer"], out, chunk_mb=2 / 1024, num_tasks=3, task_id=task,
                               **ARGS) is None
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match=r"units have no finished part \(units 1, 4, 7, .*\); unit u belongs to "
                                        r"--task-id u % --num-tasks"):
        merge(out)
    env = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1"}  # --array=1-3
    proc = run_cli("tokenize", "--input", *corpus["paths"], "--tokenizer", str(tiny["tokenizer"]), "--output",
                   str(out), "--val-fraction", "0.1", "--test-count", "20", "--shard-tokens", "2000", "--chunk-mb",
                   str(2 / 1024), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "task 1 of 3" in proc.stderr and "python -m data_prep merge" in proc.stderr
    proc = run_cli("merge", str(out))
    assert proc.returncode == 0, proc.stderr
    assert files_of(out) == files_of(tmp_path / "single")
    assert "nothing to do" in run_cli("merge", str(out)).stderr
