"""data_prep.pipeline: `tokenize` and `merge` as a whole, in this process. The shards hold exactly the ids of
`tokenizers` plus eos per document; the output is byte-identical for any number of workers (threads or spawned
worker processes), work-unit size, batch size or backend; a finished run re-run does nothing; a re-run after an
input was edited in place, or after the disk filled up, resumes without stale or half-written parts; array tasks
merged equal one run. A killed `python -m data_prep` resuming: tests/cli/test_data_prep.py."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.errors import DataError
from data_prep.parts import PARTS_DIR
from data_prep.pipeline import auto_chunk_bytes, merge, tokenize_corpus
from data_prep.shards import ShardSet
from data_prep.workers import MIN_MB_PER_PROCESS_ENV
from tests.conftest import PARALLEL_ARGS, docs_of, files_of, reference_ids


@pytest.fixture(autouse=True)
def worker_processes_even_for_tiny_inputs(monkeypatch):
    monkeypatch.setenv(MIN_MB_PER_PROCESS_ENV, "0")  # else --workers N runs small inputs in-process


def test_round_trip_jsonl_and_txt_equals_tokenizers_plus_eos(tiny, tmp_path):
    out = tmp_path / "shards"
    manifest = tokenize_corpus([str(tiny["jsonl"]), str(tiny["txt_dir"])], tiny["tokenizer"], out)
    shards = ShardSet(out)
    eos = manifest["tokenizer"]["eos_id"]
    assert eos == tiny["hf"].token_to_id("<|endoftext|>") == 0
    expected = [ids + [eos] for ids in reference_ids(tiny["hf"], tiny["docs"])]
    assert docs_of(shards) == expected
    assert shards.num_tokens == sum(map(len, expected)) == manifest["splits"]["train"]["num_tokens"]
    assert manifest["splits"]["train"]["num_docs"] == 123
    assert manifest["inputs"] == [str(tiny["jsonl"])] + [str(tiny["txt_dir"] / f"doc{i}.txt") for i in range(3)]
    tokens = shards.tokens(0)
    assert isinstance(tokens, np.memmap) and tokens.ndim == 1 and not tokens.flags.writeable
    assert shards.tokens(0) is tokens  # cached


# ----------------------------------------------------------------------------------------- workers, units and backends


def test_default_unit_size_is_a_sixteenth_of_the_input_within_1_to_16_mib():
    mib = 1 << 20
    assert auto_chunk_bytes(0) == auto_chunk_bytes(16 * mib) == mib  # up to 16 MiB of input: 1 MiB units
    assert auto_chunk_bytes(72 * mib) == 72 * mib // 16  # the benchmark's corpus: 16 units of 4.5 MiB
    assert auto_chunk_bytes(10_000 * mib) == 16 * mib


def test_output_is_byte_identical_for_any_workers_chunks_batches(tiny, parallel_corpus, tmp_path):
    paths = parallel_corpus["paths"]
    reference = tokenize_corpus(paths, tiny["tokenizer"], tmp_path / "a", **PARALLEL_ARGS)
    tokenize_corpus(paths, tiny["tokenizer"], tmp_path / "b", workers=2, chunk_mb=3 / 1024, batch_size=5,
                    **PARALLEL_ARGS)
    tokenize_corpus(paths, tiny["tokenizer"], tmp_path / "c", workers=3, chunk_mb=1 / 1024, **PARALLEL_ARGS)
    os.environ.pop(MIN_MB_PER_PROCESS_ENV)
    tokenize_corpus(paths, tiny["tokenizer"], tmp_path / "d", workers=2, **PARALLEL_ARGS)  # in-process: small input
    a = files_of(tmp_path / "a")
    assert a == files_of(tmp_path / "b") == files_of(tmp_path / "c") == files_of(tmp_path / "d")
    assert not (tmp_path / "b" / PARTS_DIR).exists()
    assert [reference["splits"][s]["num_docs"] for s in ("train", "val", "test")] == [517, 63, 20]
    ids = [i + [0] for i in reference_ids(tiny["hf"], parallel_corpus["texts"])]
    got = sorted(d for s in ("train", "val", "test") for d in docs_of(ShardSet(tmp_path / "a", s)))
    assert got == sorted(ids)


def test_backends_give_identical_shards(tiny, parallel_corpus, tmp_path):
    paths = parallel_corpus["paths"]
    m1 = tokenize_corpus(paths[:1], tiny["tokenizer"], tmp_path / "g", workers=2, chunk_mb=2 / 1024,
                         backend="gigatoken")
    m2 = tokenize_corpus(paths[:1], tiny["tokenizer"], tmp_path / "t", backend="tokenizers")
    assert (m1["tokenizer"]["backend"], m2["tokenizer"]["backend"]) == ("gigatoken", "tokenizers")
    g, t = files_of(tmp_path / "g"), files_of(tmp_path / "t")
    assert {k: v for k, v in g.items() if k != "manifest.json"} == {k: v for k, v in t.items() if k != "manifest.json"}
    m2["tokenizer"]["backend"] = "gigatoken"
    assert m1 == m2  # the manifests differ only in the backend they record


def test_finished_run_rerun_does_nothing_and_says_so(tiny, parallel_corpus, tmp_path, capsys):
    paths = parallel_corpus["paths"]
    out = tmp_path / "out"
    tokenize_corpus(paths, tiny["tokenizer"], out, **PARALLEL_ARGS)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    tokenize_corpus(paths, tiny["tokenizer"], out, workers=2, **PARALLEL_ARGS)  # workers do not change the output
    assert "nothing to do: " in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    tokenize_corpus(paths, tiny["tokenizer"], out, val_fraction=0.2, shard_tokens=2_000)  # other args
    assert "nothing to do" not in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["val_fraction"] == 0.2


# -------------------------------------------------------------------------------------------------------------- resume


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


# --------------------------------------------------------------------------------------------------------- array tasks


def test_array_tasks_merged_equal_single_run(tiny, parallel_corpus, tmp_path, monkeypatch, capfd):
    paths = parallel_corpus["paths"]
    tokenize_corpus(paths, tiny["tokenizer"], tmp_path / "single", **PARALLEL_ARGS)
    out = tmp_path / "tasks"
    for task in (2, 0):
        assert tokenize_corpus(paths, tiny["tokenizer"], out, chunk_mb=2 / 1024, num_tasks=3, task_id=task,
                               **PARALLEL_ARGS) is None
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match=r"units have no finished part \(units 1, 4, 7, .*\); unit u belongs to "
                                        r"--task-id u % --num-tasks"):
        merge(out)
    # The command line of the last task, as in a Slurm array job (--array=1-3): the task comes from the environment.
    for name, value in {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1"}.items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    assert main(["tokenize", "--input", *paths, "--tokenizer", str(tiny["tokenizer"]), "--output", str(out),
                 "--val-fraction", "0.1", "--test-count", "20", "--shard-tokens", "2000",
                 "--chunk-mb", str(2 / 1024)]) == 0
    err = capfd.readouterr().err
    assert "task 1 of 3" in err and "python -m data_prep merge" in err
    assert main(["merge", str(out)]) == 0
    assert files_of(out) == files_of(tmp_path / "single")
    capfd.readouterr()
    assert main(["merge", str(out)]) == 0
    assert "nothing to do" in capfd.readouterr().err
