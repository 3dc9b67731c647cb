"""The worker pool of `tokenize`: each work unit read, encoded in batches and written as its part
(`data_prep.parts`), in this process, in threads or in spawned processes; the output is the same either way.

Below MIN_MB_PER_PROCESS of input per worker, --workers N runs N threads in this process instead of N processes:
starting a process costs ~1 s of imports, and gigatoken releases the GIL while encoding, so threads overlap one
unit's JSON parsing with the others' encoding; only past a few hundred MB do processes (which also parse in
parallel) win.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_prep import faults
from data_prep.backend import TokenizerBackend
from data_prep.encode import encode_examples, read_framing, with_type_ids
from data_prep.errors import DataError
from data_prep.parts import PART_VERSION, write_meta, write_part
from data_prep.pieces import Piece, ReadStats
from data_prep.progress import Progress
from data_prep.readers import Unit
from data_prep.records import Extractor, RecordSpec, template_specials

MIN_MB_PER_PROCESS_ENV = "DATA_PREP_MIN_MB_PER_PROCESS"
MIN_MB_PER_PROCESS = 256


@dataclass(frozen=True)
class UnitJob:
    """What every unit of a run shares (sent once to each worker process)."""

    tokenizer_dir: str
    backend: str  # the backend the parent checked against the reference on a sample of the corpus
    spec: RecordSpec
    dtype: str
    eos_id: int
    batch_size: int
    parts_dir: str
    part_key: str


class UnitEncoder:
    """Turns work units into parts with one loaded tokenizer: one per worker process, or one shared by threads."""

    def __init__(self, job: UnitJob, encoder: TokenizerBackend | None = None):
        self.job = job
        # A worker process loads the tokenizer; a run in this process reuses the parent's checked encoder.
        self.encoder = encoder or TokenizerBackend(job.tokenizer_dir, backend=job.backend, checked=True)
        # The chat template's {{ eos_token }} is the run's eos (--eos-token may name one the tokenizer does not).
        specials = template_specials(self.encoder.tokenizer, {**self.encoder.special_ids, "eos_id": job.eos_id})
        self.extractor = Extractor(job.spec, job.tokenizer_dir, specials)
        self.framing = read_framing(self.encoder.tokenizer, job.eos_id)
        # "mask": sft's loss mask, or the token type ids of a BERT-style pair (one uint8 per token either way)
        self.with_mask = job.spec.kind == "sft" or with_type_ids(self.framing, job.spec)
        self.with_labels = job.spec.kind == "classification"

    def run(self, unit: int, pieces: list[Piece]) -> dict:
        """Tokenize one unit into its part; returns the part's meta, or {"error": message, "unit": unit} for a
        DataError (a bad record)."""
        parts = Path(self.job.parts_dir)
        stats, label_values = ReadStats(), {}
        try:
            num_docs, num_tokens = write_part(parts, unit, self._batches(pieces, stats, label_values),
                                              self.with_mask, self.with_labels)
        except DataError as exc:
            return {"error": str(exc), "unit": unit}
        meta = {"version": PART_VERSION, "unit": unit, "key": self.job.part_key, "num_docs": num_docs,
                "num_tokens": num_tokens, "counts": stats.as_dict(), "backend": self.encoder.name,
                "label_values": list(label_values) if self.with_labels else None}
        write_meta(parts, unit, meta)
        if faults.ACTIVE:
            faults.unit_done()
        return meta

    def _batches(self, pieces: list[Piece], stats: ReadStats, label_values: dict) -> Iterator[tuple]:
        """(tokens, document lengths, mask or None, labels or None) per batch of the unit's examples; a label is
        its index in `label_values`, which this fills in order of appearance."""
        dtype, spec = np.dtype(self.job.dtype), self.job.spec
        examples = (example for piece in pieces for _, example in self.extractor.examples(piece, stats))
        while batch := list(itertools.islice(examples, self.job.batch_size)):
            tokens, lengths, mask = encode_examples(self.encoder, batch, dtype, self.framing, spec)
            labels = np.fromiter((label_values.setdefault(e.label, len(label_values)) for e in batch),
                                 dtype=np.int64, count=len(batch)) if self.with_labels else None
            yield tokens, lengths, mask, labels


# A worker process's own UnitEncoder, made by the pool's initializer.
_PROCESS_ENCODER: UnitEncoder | None = None


def _start_worker_process(job: UnitJob) -> None:
    global _PROCESS_ENCODER
    _PROCESS_ENCODER = UnitEncoder(job)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while True:  # a worker whose parent was killed exits instead of running on as an orphan
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _run_in_worker_process(unit: int, pieces: list[Piece]) -> dict:
    return _PROCESS_ENCODER.run(unit, pieces)


def run_units(todo: list[tuple[int, Unit]], job: UnitJob, workers: int, progress: Progress,
              encoder: TokenizerBackend) -> None:
    """Run the units (in this process for 1 worker; see the module docstring for threads or processes); the first
    failure in unit order stops the run with its message. `encoder` is the parent's, checked on a sample."""
    def done(meta: dict, unit: Unit) -> None:
        if "error" in meta:
            raise DataError(meta["error"])
        progress.advance(meta["counts"]["docs_read"], unit.size, meta["num_tokens"])

    if workers == 1 or len(todo) <= 1:
        unit_encoder = UnitEncoder(job, encoder)
        for index, unit in todo:
            done(unit_encoder.run(index, unit.pieces), unit)
        return
    min_bytes = float(os.environ.get(MIN_MB_PER_PROCESS_ENV) or MIN_MB_PER_PROCESS) * (1 << 20)
    if sum(u.size for _, u in todo) < workers * min_bytes:
        unit_encoder = UnitEncoder(job, encoder)
        encoder.parallel = False  # one unit per thread, each encoding on its own thread
        with ThreadPoolExecutor(workers) as pool:
            _collect([(pool.submit(unit_encoder.run, index, unit.pieces), unit) for index, unit in todo], done)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process whose tokenizer threads may hold locks
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_start_worker_process,
                             initargs=(job,)) as pool:
        try:
            _collect([(pool.submit(_run_in_worker_process, index, unit.pieces), unit) for index, unit in todo], done)
        except BrokenProcessPool:
            raise DataError("a worker process died (killed, or out of memory); re-run the same command to resume "
                            "from the finished parts") from None


def _collect(futures: list[tuple[Future, Unit]], done: Callable[[dict, Unit], None]) -> None:
    """Hand each result to `done` in unit order, so that the error reported is the first in input order; on a
    failure the units not yet started are cancelled."""
    try:
        for future, unit in futures:
            done(future.result(), unit)
    except BaseException:
        for future, _ in futures:
            future.cancel()
        raise
