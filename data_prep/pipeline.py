"""`tokenize` and `merge`: inputs -> work units -> parts (in parallel, resumable) -> shards + manifest.json.

1. The inputs are planned into work units (`readers.plan_units`: ~--chunk-mb each, independent of --workers).
2. Each unit is read, turned into Examples (`records`), encoded in batches and written as a *part* under
   `<output>/.parts/` (tokens, document lengths, sft mask / classification labels; a `.json` written last marks it
   complete). Units run in `--workers` processes; a unit whose part exists is not redone, so a killed run re-run
   with the same arguments continues where it stopped. `--num-tasks K --task-id i` runs only units u with
   u % K == i (array jobs); `merge` then assembles.
3. Assembly reads the parts in unit order, assigns splits by document ordinal (`splits.SplitSpec`) and appends to
   the shard writers, then writes manifest.json last and removes `.parts/`. Shards and manifest therefore depend
   only on the inputs, the tokenizer and the arguments that shape the output, never on --workers, --chunk-mb,
   --batch-size, --num-tasks or the backend (the manifest records the backend; everything else is identical).

A finished output whose manifest `prep.key` equals this run's key, and which is newer than every input, is left
alone ("nothing to do"). Memory stays at one batch per worker plus one part during assembly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from data_prep.backend import TokenizerBackend, special_token_ids, load_tokenizer
from data_prep.encode import encode_examples, read_framing, with_type_ids
from data_prep.errors import DataError
from data_prep.manifest import MANIFEST_NAME, build_manifest, load_manifest, tokenizer_fingerprint, write_manifest
from data_prep.progress import Progress, log
from data_prep.readers import Piece, ReadStats, Unit, expand_inputs, plan_units
from data_prep.records import MAX_UNDECLARED_LABELS, Extractor, RecordSpec, chat_template_sha256
from data_prep.shards import ShardWriter, dtype_for_vocab
from data_prep.splits import SplitSpec

# gigatoken is trusted once it matches tokenizers on the first SAMPLE_DOCS documents, or on fewer if those
# already hold SAMPLE_CHARS characters (the reference encode costs ~1 s per MB, paid once at start-up: 50,000
# characters keep it at ~0.05 s, where 200,000 took ~0.15 s of a ~1 s run on 64 MiB).
SAMPLE_DOCS = 200
SAMPLE_CHARS = 50_000
# Below this much input per worker, --workers N runs N threads in this process instead of N processes: starting a
# process costs ~1 s of imports, and gigatoken releases the GIL while encoding, so threads overlap one unit's JSON
# parsing with the others' encoding; only past a few hundred MB do processes (which also parse in parallel) win.
# Output is identical either way.
MIN_MB_PER_PROCESS_ENV = "DATA_PREP_MIN_MB_PER_PROCESS"
MIN_MB_PER_PROCESS = 256
# --chunk-mb default: the input size / AUTO_CHUNKS, clamped to [1, 16] MiB. Each unit costs a few ms whatever its
# size (creating its part files, setting up an encode call), which at ~1 MiB units was ~20 % of the CPU time.
AUTO_CHUNKS = 16
PARTS_DIR = ".parts"
STATE_NAME = "state.json"
PART_VERSION = 2  # 2: records framed as the tokenizer's post-processor frames them (data_prep.encode)
UNIT_DELAY_ENV = "DATA_PREP_TEST_UNIT_DELAY"  # testing aid: seconds each unit sleeps after writing its part


# ---------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _watch_parent(parent: int) -> None:
    while True:  # a worker whose parent was killed exits instead of running on as an orphan
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def init_worker(cfg: dict, watch_parent: bool = True, encoder: TokenizerBackend | None = None) -> None:
    spec = RecordSpec.from_dict(cfg["spec"])
    if encoder is None:  # a worker process; in-process runs reuse the parent's checked encoder
        encoder = TokenizerBackend(cfg["tokenizer_dir"], backend=cfg["backend"], checked=True)
    special = _template_specials(cfg["tokenizer_dir"], encoder)
    _WORKER.update(cfg=cfg, encoder=encoder, extractor=Extractor(spec, cfg["tokenizer_dir"], special),
                   framing=read_framing(encoder.tokenizer, cfg["eos_id"]))
    if watch_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def _template_specials(tokenizer_dir, encoder: TokenizerBackend) -> dict:
    ids = encoder.special_ids
    name = lambda i: encoder.tokenizer.id_to_token(i) if i is not None else None  # noqa: E731
    return {"eos_token": name(ids["eos_id"]), "bos_token": name(ids.get("bos_id")),
            "pad_token": name(ids.get("pad_id"))}


def part_path(parts: Path, unit: int, what: str) -> Path:
    return parts / f"u{unit:06d}.{what}"


def run_unit(unit: int, pieces: list) -> dict:
    """Tokenize one unit into its part; returns the part's meta, or {"error": message} for a DataError."""
    cfg, encoder, extractor, framing = _WORKER["cfg"], _WORKER["encoder"], _WORKER["extractor"], _WORKER["framing"]
    parts, dtype = Path(cfg["parts_dir"]), np.dtype(cfg["dtype"])
    # "mask": sft's loss mask, or the token type ids of a BERT-style pair (one uint8 per token either way)
    with_mask = extractor.spec.kind == "sft" or with_type_ids(framing, extractor.spec)
    with_labels = extractor.spec.kind == "classification"
    suffix = f".tmp-{os.getpid()}"  # a stray worker of a killed run may still write: names never collide
    names = ["tokens", "lengths.npy"] + (["mask"] if with_mask else []) + (["labels.npy"] if with_labels else [])
    tmp = {n: part_path(parts, unit, n + suffix) for n in names}
    stats = ReadStats()
    lengths_all, labels_all, label_values = [], [], {}
    num_tokens = 0
    try:
        with open(tmp["tokens"], "wb") as tok_f, (open(tmp["mask"], "wb") if with_mask else open(os.devnull, "wb")
                                                  ) as mask_f:
            examples = (ex for piece in pieces for _, ex in extractor.examples(Piece(*piece), stats))
            while batch := list(itertools.islice(examples, cfg["batch_size"])):
                tokens, lengths, mask = encode_examples(encoder, batch, dtype, framing, extractor.spec)
                tok_f.write(memoryview(tokens).cast("B"))
                if with_mask:
                    mask_f.write(memoryview(mask))
                lengths_all.append(lengths)
                num_tokens += len(tokens)
                if with_labels:
                    labels_all.append(np.fromiter((label_values.setdefault(e.label, len(label_values))
                                                   for e in batch), dtype=np.int64, count=len(batch)))
        lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
        _save_npy(tmp["lengths.npy"], lengths)
        if with_labels:
            _save_npy(tmp["labels.npy"], np.concatenate(labels_all) if labels_all else np.zeros(0, dtype=np.int64))
        for n in names:
            os.replace(tmp[n], part_path(parts, unit, n.replace(suffix, "")))
    except DataError as exc:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        return {"error": str(exc), "unit": unit}
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    meta = {"version": PART_VERSION, "unit": unit, "key": cfg["part_key"], "num_docs": int(len(lengths)),
            "num_tokens": int(num_tokens), "counts": stats.as_dict(), "backend": encoder.name,
            "label_values": list(label_values) if with_labels else None}
    _write_json(part_path(parts, unit, "json"), meta)
    delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return meta


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
        np.save(f, array)


def _write_json(path: Path, data: dict) -> None:
    # Parts are scratch: renamed into place (safe against kills) but not fsynced; assembly checks their sizes, and
    # the shards and manifest made from them are fsynced.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _run_units(todo: list[tuple[int, Unit]], cfg: dict, workers: int, progress: Progress,
               encoder: TokenizerBackend | None = None) -> None:
    """Run the units (in-process for 1 worker); the first failure in unit order stops the run with its message."""
    def done(meta: dict, unit: Unit) -> None:
        if "error" in meta:
            raise DataError(meta["error"])
        progress.advance(meta["counts"]["docs_read"], unit.size, meta["num_tokens"])

    min_bytes = float(os.environ.get(MIN_MB_PER_PROCESS_ENV) or MIN_MB_PER_PROCESS) * (1 << 20)
    if workers == 1 or len(todo) <= 1 or sum(u.size for _, u in todo) < workers * min_bytes:
        init_worker(cfg, watch_parent=False, encoder=encoder)
        if workers == 1 or len(todo) <= 1:
            for index, unit in todo:
                done(run_unit(index, [tuple(p) for p in unit.pieces]), unit)
            return
        from concurrent.futures import ThreadPoolExecutor

        _WORKER["encoder"].parallel = False  # one unit per thread, each encoding on its own thread
        with ThreadPoolExecutor(workers) as pool:
            futures = [(pool.submit(run_unit, index, [tuple(p) for p in unit.pieces]), unit) for index, unit in todo]
            try:
                for future, unit in futures:  # in unit order, so the error reported is the first in input order
                    done(future.result(), unit)
            except BaseException:
                for future, _ in futures:
                    future.cancel()
                raise
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # never fork a process whose tokenizer threads may hold locks
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=init_worker,
                             initargs=(cfg,)) as pool:
        futures = [(pool.submit(run_unit, index, [tuple(p) for p in unit.pieces]), unit) for index, unit in todo]
        try:
            for future, unit in futures:  # in unit order, so the error reported is the first in input order
                done(future.result(), unit)
        except BrokenProcessPool:
            raise DataError("a worker process died (killed, or out of memory); re-run the same command to resume "
                            "from the finished parts") from None
        except BaseException:
            for future, _ in futures:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------- output dir + state


def _is_ours(name: str) -> bool:
    return (name == MANIFEST_NAME or name.endswith((".bin", ".idx.npy", ".labels.npy")) or name == PARTS_DIR
            or (name.startswith(".") and ".tmp" in name))


def check_output_dir(output: Path) -> None:
    """Refuse an --output that holds anything but our files (we delete ours when re-running)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory; choose another --output")
    if output.is_dir():
        others = sorted(p.name for p in output.iterdir() if not _is_ours(p.name))
        if others:
            raise DataError(f"{output}: output directory holds files that are not shards ({', '.join(others[:5])}); "
                            "choose an empty or new --output")


def _prepare_output_dir(output: Path) -> None:
    """Clear a previous run's shards from `output` (keeping the parts); refuse to delete anything else."""
    check_output_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    ours = [p for p in output.iterdir() if p.is_file() and _is_ours(p.name)]
    # The manifest goes first: from here on the directory is visibly incomplete until the new manifest lands.
    for path in sorted(ours, key=lambda p: p.name != MANIFEST_NAME):
        path.unlink()


def input_stats(files: list[str]) -> list[list]:
    """[path, size, modification time in ns] per input: an input edited in place, even at the same size, gets
    another key, so its stale parts are never reused (a resume starts over, see `_ensure_state`)."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DataError(f"{f}: cannot be read ({exc.strerror})") from None
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def _changed_input(old: list | None, new: list) -> str | None:
    """The first input of `new` whose size or modification time differs from `old` (same path), or None."""
    before = {f: (size, mtime) for f, size, mtime in old or []}
    for f, size, mtime in new:
        if f in before and before[f] != (size, mtime):
            return f
    return None


def run_key(files: list[str], fingerprint: str, spec: RecordSpec, splits: SplitSpec, shard_tokens: int) -> str:
    """sha256 of everything the output depends on: input paths, sizes and modification times, tokenizer, record
    spec, splits, sharding."""
    desc = {"inputs": input_stats(files), "tokenizer": fingerprint, "record": spec.as_dict(),
            "splits": splits.as_dict(), "shard_tokens": shard_tokens, "format": PART_VERSION}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _finished(output: Path, key: str, files: list[str]) -> dict | None:
    """The manifest if `output` already holds this run's finished result (same key, newer than every input)."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = load_manifest(output)
    except DataError:
        return None
    if manifest.get("prep", {}).get("key") != key:
        return None
    written = path.stat().st_mtime_ns
    return manifest if all(os.stat(f).st_mtime_ns <= written for f in files) else None


def _ensure_state(parts: Path, state: dict, num_tasks: int) -> None:
    """Create .parts/state.json, or check that the existing one is this run's; a single task restarts a stale one."""
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / STATE_NAME
    tmp = parts / f".{STATE_NAME}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.link(tmp, path)  # atomic create-if-absent: concurrent array tasks agree on one state file
    except FileExistsError:
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("part_key") != state["part_key"]:
            changed = _changed_input(existing.get("inputs"), state["inputs"])
            why = (f"input {changed} changed (size or modification time) since they were written" if changed
                   else "other inputs or arguments")
            if num_tasks > 1:
                tmp.unlink()
                raise DataError(f"{parts}: holds parts of a different run ({why}); remove {parts} and re-run every "
                                "task of the array job")
            log(f"{parts}: parts of a different run found ({why}); starting over")
            for p in parts.iterdir():
                if p != tmp:
                    p.unlink()
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------------- tokenize


def auto_chunk_bytes(total_bytes: int) -> int:
    """The default work unit size for inputs of `total_bytes` (--chunk-mb not given)."""
    return min(max(total_bytes // AUTO_CHUNKS, 1 << 20), 16 << 20)


def tokenize_corpus(inputs: list[str], tokenizer_dir: str | Path, output: str | Path,
                    text_field: str | list[str] = "text", val_fraction: float = 0.0, shard_tokens: int = 50_000_000,
                    batch_size: int = 1024, backend: str | None = None, *, spec: RecordSpec | None = None,
                    val_count: int = 0, test_fraction: float = 0.0, test_count: int = 0, workers: int = 1,
                    chunk_mb: float | None = None, num_tasks: int = 1, task_id: int = 0,
                    hf_splits: list[str] | None = None, splits_from_input: bool = False) -> dict | None:
    """Tokenize `inputs` into shards under `output`; returns the manifest (None for a task of a multi-task run,
    whose parts `merge` assembles). `hf_splits` / `splits_from_input`: which splits of hf: inputs are read, and
    whether their train / validation / test become ours (see `data_prep.hf_datasets`)."""
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
        from data_prep.hf_datasets import prepare

        files, file_splits, spec = prepare(files, spec, splits.from_input)  # checks columns; ClassLabel names
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    key = run_key(files, fingerprint, spec, splits, shard_tokens)
    check_output_dir(output)
    finished = _finished(output, key, files)
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
    special_ids = special_token_ids(tokenizer_dir, hf)
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    specials = {f"{k[:-3]}_token": hf.id_to_token(v) if v is not None else None for k, v in special_ids.items()}
    extractor = Extractor(spec, tokenizer_dir, specials)
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
        from data_prep.hf_datasets import input_splits

        state.update(unit_splits=unit_splits, input_splits=input_splits(files, file_splits))
    _ensure_state(parts, state, num_tasks)
    mine = [(i, u) for i, u in enumerate(units) if i % num_tasks == task_id]
    todo = [(i, u) for i, u in mine if not _part_done(parts, i, part_key)]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} units already done")
    progress.total = sum(u.size for _, u in mine)
    todo_ids = {i for i, _ in todo}
    progress.advance(0, sum(u.size for i, u in mine if i not in todo_ids))
    cfg = {"tokenizer_dir": str(tokenizer_dir), "backend": encoder.name, "spec": spec.as_dict(),
           "dtype": dtype.name, "eos_id": special_ids["eos_id"], "batch_size": batch_size, "parts_dir": str(parts),
           "part_key": part_key}
    _run_units(todo, cfg, workers, progress, encoder)
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


def _part_done(parts: Path, unit: int, part_key: str) -> bool:
    path = part_path(parts, unit, "json")
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("key") == part_key
    except (OSError, json.JSONDecodeError):
        return False


def _summary(manifest: dict) -> str:
    counts = manifest["counts"]
    bad = sum(counts.get("bad_records", {}).values())
    return (", ".join(f"{s} {m['num_docs']:,} docs / {m['num_tokens']:,} tokens / {len(m['shards'])} shards"
                      for s, m in manifest["splits"].items())
            + f"; backend {manifest['tokenizer']['backend']}; dropped {counts['docs_empty_dropped']:,} empty"
            + (f", skipped {bad:,} bad records" if bad else ""))


# ---------------------------------------------------------------------------------------------- assembly / merge


def merge(output: str | Path) -> dict:
    """Assemble the parts of a multi-task run (`--num-tasks K`) into shards + manifest.json."""
    output = Path(output)
    parts = output / PARTS_DIR
    if not (parts / STATE_NAME).is_file():
        try:
            manifest = load_manifest(output)
        except DataError:
            raise DataError(f"{output}: no parts to merge ({parts / STATE_NAME} not found); run `python -m "
                            "data_prep tokenize ... --output` with this directory first") from None
        log(f"nothing to do: {output} is already merged")
        return manifest
    progress = Progress("merge")
    manifest = assemble(output)
    progress.finish("; " + _summary(manifest))
    return manifest


def _label_table(metas: list[dict], spec: RecordSpec) -> tuple[list, list[np.ndarray]]:
    """(the label set in id order, per part: local label index -> global id)."""
    values = [v for m in metas for v in m["label_values"]]
    if spec.labels is not None:
        labels = list(spec.labels)
        ids = {v: i for i, v in enumerate(labels)}
        lookup = lambda v: ids[v] if v in ids else int(v)  # noqa: E731  (an int label is an id into --labels)
    elif spec.num_labels is not None:
        labels, lookup = list(range(spec.num_labels)), int
    else:
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            raise DataError("the labels mix strings and integers; make them one type or pass --labels")
        if kinds == {int}:
            labels = list(range(max(values) + 1)) if values else []
            lookup = int
        else:
            labels = sorted(set(values))
            if len(labels) > MAX_UNDECLARED_LABELS:
                raise DataError(f"the data holds {len(labels):,} distinct labels, more than {MAX_UNDECLARED_LABELS:,}; "
                                f"is --label-field {spec.label_field!r} the label? Pass --labels to declare the label "
                                "set")
            ids = {v: i for i, v in enumerate(labels)}
            lookup = ids.__getitem__
    maps = [np.asarray([lookup(v) for v in m["label_values"]], dtype=np.int64) for m in metas]
    return labels, maps


def assemble(output: Path) -> dict:
    parts = output / PARTS_DIR
    state = json.loads((parts / STATE_NAME).read_text(encoding="utf-8"))
    n = state["num_units"]
    missing = [i for i in range(n) if not _part_done(parts, i, state["part_key"])]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{output}: {len(missing)} of {n} units have no finished part (units {shown}); unit u "
                        "belongs to --task-id u % --num-tasks: re-run those tasks, then merge")
    metas = [json.loads(part_path(parts, i, "json").read_text(encoding="utf-8")) for i in range(n)]
    spec, splits = RecordSpec.from_dict(state["spec"]), SplitSpec(**state["splits"])
    stats = ReadStats()
    for meta in metas:
        stats.add(meta["counts"])
    total = sum(m["num_docs"] for m in metas)
    if total == 0:
        raise DataError(f"the inputs hold no non-empty documents ({stats.docs_read} read)")
    if splits.val_fraction > 0 and total < 2:
        raise DataError(f"--val-fraction {splits.val_fraction} needs at least 2 documents, the inputs hold {total}")
    thresholds = splits.thresholds(total)
    kind = spec.kind
    with_mask, with_labels = kind == "sft" or state["token_type_ids"], kind == "classification"
    label_names, label_maps = _label_table(metas, spec) if with_labels else (None, None)
    dtype = np.dtype(state["dtype"])
    _prepare_output_dir(output)
    unit_splits = state.get("unit_splits")  # --splits-from-input: the split of every unit
    names = splits.split_names() if unit_splits is None else ["train"] + [
        {1: "val", 2: "test"}[c] for c in sorted(set(unit_splits) - {0})]
    writers = {s: ShardWriter(output, s, dtype, state["shard_tokens"], with_mask, with_labels) for s in names}
    codes = {0: "train", 1: "val", 2: "test"}
    mask_tokens = dict.fromkeys(names, 0)
    label_counts = {s: np.zeros(len(label_names or []), dtype=np.int64) for s in names}
    ordinal = 0
    try:
        for i, meta in enumerate(metas):
            try:
                tokens = np.fromfile(part_path(parts, i, "tokens"), dtype=dtype)
                lengths = np.load(part_path(parts, i, "lengths.npy"))
                mask = np.fromfile(part_path(parts, i, "mask"), dtype=np.uint8) if with_mask else None
                labels = label_maps[i][np.load(part_path(parts, i, "labels.npy"))] if with_labels else None
                ok = (len(tokens) == meta["num_tokens"] and len(lengths) == meta["num_docs"]
                      and int(lengths.sum()) == len(tokens) and (mask is None or len(mask) == len(tokens)))
            except (OSError, ValueError, IndexError):
                ok = False
            if not ok:
                part_path(parts, i, "json").unlink(missing_ok=True)  # so that the re-run redoes this unit
                raise DataError(f"{part_path(parts, i, 'tokens')}: part of unit {i} is damaged (a crash?); re-run "
                                "the same command to redo it")
            assign = splits.assign(ordinal, len(lengths), thresholds) if unit_splits is None else np.full(
                len(lengths), unit_splits[i], dtype=np.uint8)
            ordinal += len(lengths)
            for code in np.unique(assign):
                split = codes[int(code)]
                if len(np.unique(assign)) == 1:
                    t, l, m, lab = tokens, lengths, mask, labels
                else:
                    docs = assign == code
                    per_token = np.repeat(docs, lengths)
                    t, l = tokens[per_token], lengths[docs]
                    m = mask[per_token] if with_mask else None
                    lab = labels[docs] if with_labels else None
                writers[split].add(t, l, m, lab)
                if kind == "sft":
                    mask_tokens[split] += int(np.count_nonzero(m))
                if with_labels:
                    label_counts[split] += np.bincount(lab, minlength=len(label_names))[:len(label_names)]
        entries = {split: writer.close() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split in names if unit_splits is not None else []:
        if not entries[split]:
            sources = ", ".join(state["input_splits"].get(split, [])) or "no split of the inputs"
            raise DataError(f"--splits-from-input: our {split} split holds no documents (it is read from "
                            f"{sources}); every record there is empty or bad, or the inputs have no train split")
    if not entries["train"]:
        raise DataError(f"--val-fraction {splits.val_fraction} left no training documents; lower it")
    if "test" in entries and not entries["test"]:
        raise DataError(f"--test-fraction {splits.test_fraction} left the test split empty ({total} documents); "
                        "raise it or use --test-count")
    extra = {"input_splits": state["input_splits"]} if unit_splits is not None else {}
    extra["framing"] = state["framing"]
    if kind == "sft":
        extra["sft"] = {"format": "messages" if spec.messages_field else "prompt_response", "mask_dtype": "uint8",
                        "mask_tokens": mask_tokens}
    if with_labels:
        extra["classification"] = {"labels": label_names, "num_labels": len(label_names),
                                   "label_counts": {s: c.tolist() for s, c in label_counts.items()},
                                   "text_pair": bool(spec.text_pair_field),
                                   "token_type_ids": state["token_type_ids"]}
    backends = sorted({m["backend"] for m in metas})
    prep = {"key": state["key"], "record": spec.as_dict(), "splits": splits.as_dict(),
            "shard_tokens": state["shard_tokens"]}
    manifest = build_manifest(tokenizer_dir=state["tokenizer_dir"], vocab_size=state["vocab_size"],
                              special_ids=state["special_ids"], backend="+".join(backends), dtype=dtype.name,
                              splits=entries, inputs=state["files"], val_fraction=splits.val_fraction,
                              counts=stats.as_dict(), record_kind=kind, fingerprint=state["fingerprint"],
                              chat_template_sha256=state["chat_template_sha256"], extra=extra, prep=prep)
    write_manifest(output, manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
