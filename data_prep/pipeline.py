"""`tokenize` and `merge`: inputs -> work units -> parts (in parallel, resumable) -> shards + manifest.json.

1. The inputs are planned into work units (`readers.plan_units`: ~--chunk-mb each, independent of --workers).
2. Each unit is read, turned into Examples (`records`), encoded in batches (`encode`) and written as a part under
   `<output>/.parts/` (`parts`), in `--workers` threads or processes (`workers`). A unit whose part exists is not
   redone, so a killed run re-run with the same arguments continues where it stopped (`resume_state`).
   `--num-tasks K --task-id i` runs only units u with u % K == i (array jobs); `merge` then assembles.
3. Assembly (`assemble`) reads the parts in unit order, assigns splits by document ordinal (`splits.SplitSpec`) and
   writes the shards, then manifest.json last. Shards and manifest therefore depend only on the inputs, the
   tokenizer and the arguments that shape the output, never on --workers, --chunk-mb, --batch-size, --num-tasks or
   the backend (the manifest records the backend; everything else is identical).

A finished output whose manifest `prep.key` equals this run's key, and which is newer than every input, is left
alone ("nothing to do"). Memory stays at one batch per worker plus one part during assembly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import os
from pathlib import Path

from data_prep import hf_datasets
from data_prep.assemble import assemble, check_output_dir
from data_prep.backend import TokenizerBackend, load_tokenizer, require_eos, special_token_ids
from data_prep.encode import read_framing, with_type_ids
from data_prep.errors import DataError
from data_prep.manifest import MANIFEST_NAME, load_manifest, tokenizer_fingerprint
from data_prep.parts import PARTS_DIR, part_done
from data_prep.pieces import ReadStats
from data_prep.progress import Progress, log
from data_prep.readers import Unit, expand_inputs, plan_units
from data_prep.records import Extractor, RecordSpec, chat_template_sha256, template_specials
from data_prep.resume_state import ensure_state, finished_manifest, input_stats, run_key, state_path
from data_prep.shards import dtype_for_vocab
from data_prep.splits import SplitSpec
from data_prep.workers import UnitJob, run_units

# gigatoken is trusted once it matches tokenizers on the first SAMPLE_DOCS documents, or on fewer if those
# already hold SAMPLE_CHARS characters (the reference encode costs ~1 s per MB, paid once at start-up: 50,000
# characters keep it at ~0.05 s, where 200,000 took ~0.15 s of a ~1 s run on 64 MiB).
SAMPLE_DOCS = 200
SAMPLE_CHARS = 50_000
# --chunk-mb default: the input size / AUTO_CHUNKS, clamped to [1, 16] MiB. Each unit costs a few ms whatever its
# size (creating its part files, setting up an encode call), which at ~1 MiB units was ~20 % of the CPU time.
AUTO_CHUNKS = 16


def auto_chunk_bytes(total_bytes: int) -> int:
    """The default work unit size for inputs of `total_bytes` (--chunk-mb not given)."""
    return min(max(total_bytes // AUTO_CHUNKS, 1 << 20), 16 << 20)


def tokenize_corpus(inputs: list[str], tokenizer_dir: str | Path, output: str | Path,
                    text_field: str | list[str] = "text", val_fraction: float = 0.0, shard_tokens: int = 50_000_000,
                    batch_size: int = 1024, backend: str | None = None, *, spec: RecordSpec | None = None,
                    val_count: int = 0, test_fraction: float = 0.0, test_count: int = 0, workers: int = 1,
                    chunk_mb: float | None = None, num_tasks: int = 1, task_id: int = 0,
                    hf_splits: list[str] | None = None, splits_from_input: bool = False,
                    eos_token: str | None = None) -> dict | None:
    """Tokenize `inputs` into shards under `output`; returns the manifest (None for a task of a multi-task run,
    whose parts `merge` assembles). `hf_splits` / `splits_from_input`: which splits of hf: inputs are read, and
    whether their train / validation / test become ours (see `data_prep.hf_datasets`). `eos_token`: the token that
    separates documents, for a tokenizer that names none (see `backend.special_token_ids`)."""
    if shard_tokens < 1 or batch_size < 1:
        raise DataError("--shard-tokens and --batch-size must be >= 1")
    if workers < 1:
        raise DataError(f"--workers {workers} must be >= 1")
    if chunk_mb is not None and chunk_mb <= 0:
        raise DataError(f"--chunk-mb {chunk_mb} must be > 0")
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise DataError(f"--task-id {task_id} must be in [0, --num-tasks {num_tasks})")
    if spec is None:
        spec = RecordSpec(text_fields=(text_field,) if isinstance(text_field, str) else tuple(text_field))
    spec.validate()
    splits = SplitSpec(val_fraction, val_count, test_fraction, test_count, from_input=splits_from_input)
    output = Path(output)
    files = expand_inputs(inputs, hf_splits, splits_from_input)
    file_splits = None  # --splits-from-input: per file, the split code its documents keep
    if splits.from_input or any(f.endswith(".arrow") for f in files):
        # checks the columns; a ClassLabel column gives the label names
        files, file_splits, spec = hf_datasets.prepare(files, spec, splits.from_input)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    key = run_key(files, fingerprint, spec, splits, shard_tokens, eos_token)
    check_output_dir(output)
    finished = finished_manifest(output, key, files)
    if finished is not None:
        log(f"nothing to do: {output} already holds the shards of this exact run (same inputs, tokenizer and "
            "arguments); delete its manifest.json to redo it")
        return finished
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST_NAME).unlink(missing_ok=True)  # stale: the directory is incomplete until the new one lands
    progress = Progress("tokenize")  # started here so the rate includes the plan and the backend check
    if chunk_mb is None:
        chunk_bytes = auto_chunk_bytes(sum(os.path.getsize(f) for f in files))
    else:
        chunk_bytes = max(1, int(chunk_mb * (1 << 20)))
    units, unit_splits = _plan(files, file_splits, chunk_bytes, spec.txt_mode)

    hf = load_tokenizer(tokenizer_dir)
    special_ids = special_token_ids(tokenizer_dir, hf, eos_token)
    require_eos(tokenizer_dir, special_ids)
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    extractor = Extractor(spec, tokenizer_dir, template_specials(hf, special_ids))
    sample = _take_sample(extractor, units)
    if not sample:
        stats = ReadStats()
        list(itertools.chain.from_iterable(extractor.examples(p, stats) for u in units for p in u.pieces))
        raise DataError(f"the inputs hold no non-empty documents ({stats.docs_read} read, all empty"
                        f"{' or bad' if stats.bad_records else ''})")
    encoder = TokenizerBackend(tokenizer_dir, sample, backend)
    log(f"backend {encoder.name} ({encoder.reason})")
    framing = read_framing(encoder.tokenizer, special_ids["eos_id"])
    dtype = dtype_for_vocab(vocab_size)

    parts = output / PARTS_DIR
    part_key = hashlib.sha256(f"{key}/{chunk_bytes}/{len(units)}".encode()).hexdigest()
    state = {"part_key": part_key, "key": key, "num_units": len(units), "files": files,
             "inputs": input_stats(files),
             "tokenizer_dir": str(tokenizer_dir), "fingerprint": fingerprint, "spec": spec.as_dict(),
             "splits": splits.as_dict(), "shard_tokens": shard_tokens, "dtype": dtype.name,
             "vocab_size": vocab_size, "special_ids": special_ids, "framing": framing.as_dict(),
             "token_type_ids": with_type_ids(framing, spec),
             "chat_template_sha256": chat_template_sha256(tokenizer_dir)}
    if unit_splits is not None:
        state.update(unit_splits=unit_splits, input_splits=hf_datasets.input_splits(files, file_splits))
    ensure_state(parts, state, num_tasks)
    mine = [(i, u) for i, u in enumerate(units) if i % num_tasks == task_id]
    todo = [(i, u) for i, u in mine if not part_done(parts, i, part_key)]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} units already done")
    progress.total = sum(u.size for _, u in mine)
    todo_ids = {i for i, _ in todo}
    progress.advance(0, sum(u.size for i, u in mine if i not in todo_ids))
    job = UnitJob(tokenizer_dir=str(tokenizer_dir), backend=encoder.name, spec=spec, dtype=dtype.name,
                  eos_id=special_ids["eos_id"], batch_size=batch_size, parts_dir=str(parts), part_key=part_key)
    run_units(todo, job, workers, progress, encoder)
    if num_tasks > 1:
        progress.finish(f"; task {task_id} of {num_tasks}: {len(mine)} units done. When every task has finished, "
                        f"run `python -m data_prep merge {output}`")
        return None
    manifest = assemble(output)
    progress.finish("; " + _summary(manifest))
    return manifest


def _plan(files: list[str], file_splits: list[int] | None, chunk_bytes: int, txt_mode: str
          ) -> tuple[list[Unit], list[int] | None]:
    """The work units, and with --splits-from-input each unit's split code (each split is planned apart, so a unit
    never holds documents of two splits)."""
    if file_splits is None:
        return plan_units(files, chunk_bytes, txt_mode), None
    units, codes = [], []
    for code in sorted(set(file_splits)):
        planned = plan_units([f for f, c in zip(files, file_splits) if c == code], chunk_bytes, txt_mode)
        units += planned
        codes += [code] * len(planned)
    return units, codes


def _summary(manifest: dict) -> str:
    counts = manifest["counts"]
    bad = sum(counts.get("bad_records", {}).values())
    return (", ".join(f"{s} {m['num_docs']:,} docs / {m['num_tokens']:,} tokens / {len(m['shards'])} shards"
                      for s, m in manifest["splits"].items())
            + f"; backend {manifest['tokenizer']['backend']}; dropped {counts['docs_empty_dropped']:,} empty"
            + (f", skipped {bad:,} bad records" if bad else ""))


def _take_sample(extractor: Extractor, units: list[Unit]) -> list[str]:
    """The strings of the corpus's first documents (bad records skipped here; they are reported by the run)."""
    sample, chars = [], 0
    quiet = copy.copy(extractor)
    quiet.spec = dataclasses.replace(extractor.spec, on_bad="skip")
    stats = ReadStats()
    for unit in units:
        for piece in unit.pieces:
            for _, example in quiet.examples(piece, stats):
                sample += example.segments
                chars += sum(map(len, example.segments))
                if len(sample) >= SAMPLE_DOCS or chars >= SAMPLE_CHARS:
                    return sample
    return sample


def merge(output: str | Path) -> dict:
    """Assemble the parts of a multi-task run (`--num-tasks K`) into shards + manifest.json."""
    output = Path(output)
    state = state_path(output / PARTS_DIR)
    if not state.is_file():
        try:
            manifest = load_manifest(output)
        except DataError:
            raise DataError(f"{output}: no parts to merge ({state} not found); run `python -m "
                            "data_prep tokenize ... --output` with this directory first") from None
        log(f"nothing to do: {output} is already merged")
        return manifest
    progress = Progress("merge")
    manifest = assemble(output)
    progress.finish("; " + _summary(manifest))
    return manifest
