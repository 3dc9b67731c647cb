"""`hf:` inputs: Hugging Face `datasets` data where users keep it, read straight from its arrow files.

  hf:DIR             a directory written by `Dataset.save_to_disk` (state.json, dataset_info.json, arrow files) or
                     `DatasetDict.save_to_disk` (dataset_dict.json and one such directory per split)
  hf:NAME[:CONFIG]   a dataset in the local datasets cache, put there once by `load_dataset(NAME[, CONFIG])`:
                     $HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/huggingface/datasets, laid out as
                     <namespace>___<name>/<config>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow. Read
                     offline, never fetched; with several versions cached, the newest (as `datasets` picks offline)

Splits: a plain `Dataset` is one split (named by its state.json `_split`, else `train`). Which splits are read:
`--hf-split NAME` (those named), else with `--splits-from-input` train / validation / test (they become our train /
val / test splits; tokenize keeps them apart), else the only split or `train` (the others are named in the log,
so that a test split never leaks into training by default). A split that does not exist, or holds no rows, is an
error before anything is written.

Reading: an arrow file (the Arrow IPC stream format `datasets` writes) is memory-mapped and read record batch by
record batch, only the columns needed, as `datasets` itself reads it; no dataset is ever loaded whole. Work units
are runs of whole record batches (`datasets` writes ~1000 rows per batch), like parquet row groups, so what a unit
reads and counts never depends on how the input was cut. `datasets` itself is not imported (its import costs ~1 s
and nothing here needs it): the layouts are read from their JSON files and the features from each arrow file's
schema metadata (the same `huggingface` entry `datasets` reads), else the directory's dataset_info.json.

Features: a `ClassLabel` label column gives the label set in its names' order (`label_names`); its ids are read as
those names, and an id outside the names (e.g. -1, "no label" in unlabelled test splits) is an `unknown_label` bad
record. A missing column, or one of the wrong type (text that is not a string column, ...), is one error that names
the dataset and lists its columns.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple

from data_prep.errors import DataError
from data_prep.pieces import BadRecord, Piece, ReadStats, too_large
from data_prep.progress import log
from data_prep.splits import SPLIT_CODES, SPLITS

PREFIX = "hf:"
OUR_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # a dataset's split -> ours (--splits-from-input)
READ_ROWS = 1024  # rows turned into Python objects at a time (a record batch is ~1000 rows; bounds memory)
_NOTES: list[str] = []  # what `select` chose, logged once the inputs have passed their checks (`prepare`)


class Split(NamedTuple):
    dataset: str  # the dataset as messages name it: DIR (save_to_disk) or hf:NAME:CONFIG (cache)
    name: str  # the dataset's own split name
    files: tuple  # its arrow files, in order
    in_dict: bool  # a split of a DatasetDict / cache entry (False: a plain saved Dataset)
    info_path: str  # the dataset_info.json next to the arrow files

    def label(self) -> str:
        return f"{self.dataset}['{self.name}']" if self.in_dict else self.dataset


def is_hf(arg: str) -> bool:
    return arg.startswith(PREFIX)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); the {what} is damaged") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object; the {what} is damaged")
    return data


# ---------------------------------------------------------------------------------------------- layouts


def cache_root() -> Path:
    """The datasets cache, resolved from the environment now, as `datasets.config` does at its import."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_DATASETS_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "datasets"


def _snake(name: str) -> str:
    """datasets.naming.camelcase_to_snakecase."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def _saved_split(directory: Path, dataset: str, name: str | None, in_dict: bool) -> Split:
    state = _read_json(directory / "state.json", "saved dataset")
    listed = state.get("_data_files")  # [] for a split saved with no rows
    files = [f.get("filename") if isinstance(f, dict) else None for f in listed] if isinstance(listed, list) else None
    if files is None or not all(isinstance(f, str) for f in files):
        raise DataError(f"{directory / 'state.json'}: does not list its arrow files; the saved dataset is damaged")
    paths = tuple(str(directory / f) for f in files)
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (listed in {directory / 'state.json'}); the saved dataset is "
                            "incomplete: save it again")
    return Split(dataset, name or state.get("_split") or "train", paths, in_dict,
                 str(directory / "dataset_info.json"))


def _saved(directory: str) -> list[Split]:
    root = Path(directory)
    label = str(root)
    if (root / "dataset_dict.json").is_file():
        names = _read_json(root / "dataset_dict.json", "saved DatasetDict").get("splits")
        if not isinstance(names, list) or not names:
            raise DataError(f"{root / 'dataset_dict.json'}: lists no splits; the saved DatasetDict is damaged")
        return [_saved_split(root / str(n), label, str(n), True) for n in names]
    if (root / "state.json").is_file():
        return [_saved_split(root, label, None, False)]
    raise DataError(f"hf:{directory}: not a dataset saved with save_to_disk (it has no dataset_dict.json or "
                    "state.json); pass the directory save_to_disk wrote, data files directly (--input "
                    f"{directory} reads its .jsonl/.parquet/.csv/.txt files), or hf:NAME for a dataset in the "
                    "datasets cache")


_SHARD = r"(?:-\d{5}-of-\d{5})?\.arrow"


def _cache_splits(entry: Path, dataset: str) -> list[Split]:
    """The splits of one prepared cache entry <name>/<config>/<version>/<hash>/."""
    info_path = entry / "dataset_info.json"
    info = _read_json(info_path, "datasets cache entry")
    split_infos = info.get("splits") or {}
    if isinstance(split_infos, list):  # older dataset_info.json: a list of {name, ...}
        split_infos = {s.get("name"): s for s in split_infos if isinstance(s, dict)}
    arrows = sorted(p.name for p in entry.iterdir() if p.name.endswith(".arrow"))
    prefix = _snake(str(info.get("dataset_name") or info.get("builder_name") or ""))
    splits = []
    for name in split_infos:
        matches = [f for f in arrows if re.fullmatch(re.escape(f"{prefix}-{name}") + _SHARD, f)]
        if not matches:  # another naming: take <anything>-<split>[-shard].arrow
            matches = [f for f in arrows if re.fullmatch(r".+-" + re.escape(name) + _SHARD, f)]
        if not matches:
            raise DataError(f"{entry}: the datasets cache entry has no arrow files for split {name!r}; it is "
                            f"incomplete: load it again with load_dataset (with network access)")
        splits.append(Split(dataset, str(name), tuple(str(entry / f) for f in matches), True, str(info_path)))
    if not splits:
        raise DataError(f"{info_path}: lists no splits; the datasets cache entry is damaged")
    return splits


def _entries(base: Path) -> dict[str, list[Path]]:
    """config -> prepared entries (<config>/<version>/<hash>/ with a dataset_info.json) of a cached dataset."""
    out: dict[str, list[Path]] = {}
    if not base.is_dir():
        return out
    for config in sorted(p for p in base.iterdir() if p.is_dir()):
        found = [h for v in config.iterdir() if v.is_dir() for h in v.iterdir()
                 if h.is_dir() and not h.name.endswith(".incomplete") and (h / "dataset_info.json").is_file()]
        if found:
            out[config.name] = found
    return out


def _not_cached(name: str, config: str | None, root: Path) -> DataError:
    call = f"load_dataset({name!r}{', ' + repr(config) if config else ''})"
    near = sorted(p.name.replace("___", "/") for p in root.glob(f"*___{_snake(name.split('/')[-1])}")
                  if p.is_dir()) if root.is_dir() else []
    hint = f" (cached under that name: {', '.join('hf:' + n for n in near)})" if near else ""
    return DataError(f"hf:{name}{':' + config if config else ''}: not in the local datasets cache ({root}; set by "
                     f"HF_DATASETS_CACHE or HF_HOME){hint}. data_prep reads offline: download it first with "
                     f"`python -c \"import datasets; datasets.{call}\"` (with network access and the same cache), "
                     "or save it with save_to_disk and pass hf:DIR")


def _cached(name: str, config: str | None) -> list[Split]:
    root = cache_root()
    parts = name.split("/")
    parts[-1] = _snake(parts[-1])
    entries = _entries(root / "___".join(parts))
    if not entries:
        raise _not_cached(name, config, root)
    if config is None:
        if len(entries) > 1:
            raise DataError(f"hf:{name}: several configs are in the datasets cache ({', '.join(entries)}); pass "
                            f"hf:{name}:CONFIG")
        config = next(iter(entries))
    if config not in entries:
        raise DataError(f"hf:{name}:{config}: config {config!r} is not in the datasets cache (cached: "
                        f"{', '.join(entries)}); pass one of them, or download it first with `python -c \"import "
                        f"datasets; datasets.load_dataset({name!r}, {config!r})\"`")
    entry = max(entries[config], key=lambda p: p.stat().st_mtime)  # the newest, as datasets picks offline
    return _cache_splits(entry, f"hf:{name}:{config}")


def resolve(arg: str) -> list[Split]:
    """Every split of the dataset `hf:...` names, in the dataset's order."""
    body = arg[len(PREFIX):]
    if not body:
        raise DataError("hf: needs a save_to_disk directory or a dataset name (hf:DIR, hf:NAME[:CONFIG])")
    if os.path.isdir(body):
        return _saved(body)
    if os.path.exists(body):
        raise DataError(f"{arg}: {body} is a file; hf: takes a directory written by save_to_disk or the name of "
                        "a dataset in the datasets cache (pass data files without hf:)")
    name, _, config = body.partition(":")
    return _cached(name, config or None)


@functools.lru_cache(maxsize=None)
def num_rows(path: str) -> int:
    return sum(b.num_rows for b in _batches(path))


def select(arg: str, splits: list[Split], hf_splits: list[str] | None, from_input: bool) -> list[Split]:
    """The splits of `arg` to read (see the module doc); DataError for a missing or empty one."""
    by_name = {s.name: s for s in splits}
    shown = ", ".join(repr(n) for n in by_name)
    if hf_splits:
        missing = [n for n in hf_splits if n not in by_name]
        if missing:
            raise DataError(f"{arg} has no split {missing[0]!r} (splits: {shown}); pass --hf-split with one of "
                            "them")
        chosen = [by_name[n] for n in dict.fromkeys(hf_splits)]
    elif from_input:
        chosen = [s for s in splits if s.name in OUR_SPLITS]
        if not chosen:
            raise DataError(f"{arg} has none of the splits train, validation, test (splits: {shown}); pass "
                            "--hf-split NAME, or drop --splits-from-input")
        others = [s.name for s in splits if s.name not in OUR_SPLITS]
        if others:
            _NOTES.append(f"{arg}: --splits-from-input reads train/validation/test; not reading split(s) "
                          f"{', '.join(map(repr, others))}")
    elif len(splits) == 1:
        chosen = splits
    elif "train" in by_name:
        chosen = [by_name["train"]]
        _NOTES.append(f"{arg}: reading split 'train' (splits: {shown}); --hf-split NAME reads others, "
                      "--splits-from-input keeps validation/test as our val/test")
    else:
        raise DataError(f"{arg} has several splits and none is 'train' (splits: {shown}); pass --hf-split NAME")
    for split in chosen:
        if from_input and split.name not in OUR_SPLITS:
            raise DataError(f"{arg}: --splits-from-input maps the splits train, validation and test to ours; "
                            f"split {split.name!r} has no counterpart (drop it from --hf-split)")
        if sum(num_rows(f) for f in split.files) == 0:
            raise DataError(f"{split.label()} is empty (0 rows); pass --hf-split with a split that holds rows")
    return chosen


def clear_caches() -> None:
    """Forget what was read about datasets (a long-lived process may see a dataset saved again at the same path)."""
    for cached in (num_rows, split_of, _column_info, _schema):
        cached.cache_clear()


def expand(arg: str, hf_splits: list[str] | None = None, from_input: bool = False) -> list[str]:
    """The arrow files of the splits of `arg` to read, in order."""
    clear_caches()
    return [f for split in select(arg, resolve(arg), hf_splits, from_input) for f in split.files]


@functools.lru_cache(maxsize=None)
def split_of(path: str) -> Split:
    """The split an arrow file (from `expand`) belongs to, found from its directory alone (used in workers)."""
    directory = Path(path).parent
    if (directory / "state.json").is_file():  # save_to_disk
        parent = directory.parent
        if (parent / "dataset_dict.json").is_file():
            names = _read_json(parent / "dataset_dict.json", "saved DatasetDict").get("splits") or []
            if directory.name in names:
                return _saved_split(directory, str(parent), directory.name, True)
        return _saved_split(directory, str(directory), None, False)
    if not (directory / "dataset_info.json").is_file() or len(directory.parents) < 3:
        raise DataError(f"{path}: not part of a dataset saved with save_to_disk or of a datasets cache entry; pass "
                        "the dataset as hf:DIR or hf:NAME")
    # a cache entry: <root>/<namespace___name>/<config>/<version>/<hash>/
    dataset = f"hf:{directory.parents[2].name.replace('___', '/')}:{directory.parents[1].name}"
    for split in _cache_splits(directory, dataset):
        if path in split.files:
            return split
    raise DataError(f"{path}: not a file of any split of its datasets cache entry")


def describe(path: str) -> str:
    return split_of(path).label()


def split_codes(files: list[str]) -> list[int]:
    """--splits-from-input: per file, 0 train / 1 val / 2 test (files that are not hf: splits: train)."""
    if not any(f.endswith(".arrow") for f in files):
        raise DataError("--splits-from-input takes the splits of hf: inputs (a saved DatasetDict or a cached "
                        "dataset); none is given")
    return [SPLIT_CODES[OUR_SPLITS[split_of(f).name]] if f.endswith(".arrow") else 0 for f in files]


# ---------------------------------------------------------------------------------------------- features


def _features(path: str) -> dict:
    """The `datasets` features of an arrow file: its schema metadata, else dataset_info.json; {} if neither."""
    schema = _schema(path)
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features")
            if isinstance(features, dict):
                return features
        except (json.JSONDecodeError, AttributeError):
            pass
    info_path = Path(path).parent / "dataset_info.json"
    if info_path.is_file():
        features = _read_json(info_path, "dataset").get("features")
        if isinstance(features, dict):
            return features
    return {}


def _class_label_names(feature) -> list[str] | None:
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"),
                                                                                          list):
        return [str(n) for n in feature["names"]]
    return None


@functools.lru_cache(maxsize=None)
def _column_info(path: str) -> tuple[tuple, dict, dict]:
    """(column names, name -> arrow type, name -> ClassLabel names) of an arrow file."""
    schema = _schema(path)
    features = _features(path)
    labels = {n: names for n in schema.names if (names := _class_label_names(features.get(n))) is not None}
    return tuple(schema.names), {n: schema.field(n).type for n in schema.names}, labels


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                            lambda _: False)(t)


def _is_messages(t) -> bool:
    import pyarrow as pa

    if _is_text(t):  # a JSON string per row
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"role", "content"} <= names


# flag -> (what its column must hold, what it holds)
_WANTS = {"--label-field": ("labels (strings, integers or a ClassLabel)", "the labels"),
          "--messages-field": ("chat messages (a list of {role, content})", "the messages"),
          "--prompt-field": ("text (a string column)", "the prompt"),
          "--response-field": ("text (a string column)", "the response"),
          "--text-pair-field": ("text (a string column)", "the second text")}


def check_fields(files: list[str], spec):
    """Check that every hf: split among `files` has the columns `spec` reads, of usable types (one error naming
    the dataset and listing its columns otherwise); returns `spec`, with `labels` set to the label column's
    ClassLabel names when it is one and --labels was not given."""
    import dataclasses
    import pyarrow as pa

    names_seen: dict[tuple, str] = {}
    for path in dict.fromkeys(f for f in files if f.endswith(".arrow")):
        split = split_of(path)
        if path != split.files[0]:
            continue  # a split's files share one schema
        columns, types, class_labels = _column_info(path)
        shown = ", ".join(repr(c) for c in columns[:20]) or "none"
        for field, flag in spec.fields():
            if field not in types:
                raise DataError(f"{split.label()}: no column {field!r} (columns: {shown}); pass {flag} with the "
                                "column that holds it")
            t = types[field]
            if flag == "--label-field":
                ok = field in class_labels or _is_text(t) or pa.types.is_integer(t)
            elif flag == "--messages-field":
                ok = _is_messages(t)
            else:
                ok = _is_text(t) and field not in class_labels
            if not ok:
                what, holds = _WANTS.get(flag, ("text (a string column)", "the text"))
                kind = f"ClassLabel ids ({t})" if field in class_labels else str(t)
                raise DataError(f"{split.label()}: column {field!r} holds {kind}, not {what}; pass {flag} with the "
                                f"column that holds {holds} (columns: {shown})")
        if spec.kind == "classification" and spec.label_field in class_labels:
            names_seen.setdefault(tuple(class_labels[spec.label_field]), split.label())
    if spec.kind == "classification" and getattr(spec, "num_labels", None) is not None and names_seen:
        raise DataError(f"{next(iter(names_seen.values()))}: column {spec.label_field!r} is a ClassLabel, whose names "
                        "give the labels and their ids; drop --num-labels")
    if spec.kind == "classification" and spec.labels is None and names_seen:
        if len(names_seen) > 1:
            (a, where_a), (b, where_b) = list(names_seen.items())[:2]
            raise DataError(f"the ClassLabel names of {spec.label_field!r} differ between {where_a} ({', '.join(a)})"
                            f" and {where_b} ({', '.join(b)}); pass --labels with the label set in id order")
        spec = dataclasses.replace(spec, labels=next(iter(names_seen)))
        spec.validate()
    return spec


def prepare(files: list[str], spec, from_input: bool) -> tuple[list[str], list[int] | None, object]:
    """For tokenize: `check_fields`, and with --splits-from-input the files ordered train, val, test (stable) and
    each one's split code. Returns (files, codes or None, spec)."""
    spec = check_fields(files, spec)
    for note in dict.fromkeys(_NOTES):
        log(note)
    _NOTES.clear()
    if not from_input:
        return files, None, spec
    codes = split_codes(files)
    order = sorted(range(len(files)), key=codes.__getitem__)
    return [files[i] for i in order], [codes[i] for i in order], spec


def input_splits(files: list[str], codes: list[int]) -> dict[str, list[str]]:
    """Our split -> where it was read from (DATASET['split'], or the file), for the manifest."""
    out: dict[str, list[str]] = {}
    for path, code in zip(files, codes):
        source = describe(path) if path.endswith(".arrow") else path
        if source not in out.setdefault(SPLITS[code], []):
            out[SPLITS[code]].append(source)
    return out


# ---------------------------------------------------------------------------------------------- reading


def _open(path: str):
    import pyarrow as pa

    source = pa.memory_map(path, "r")  # zero-copy: batches point into the mapped file
    try:
        return pa.ipc.open_stream(source)  # what datasets writes
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: cannot be read as an arrow file ({exc}); the dataset is damaged") from None


@functools.lru_cache(maxsize=64)
def _schema(path: str):
    return _open(path).schema


def _batches(path: str) -> Iterator:
    import pyarrow as pa

    reader = _open(path)
    try:
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); the dataset is damaged") from None


def arrow_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Work pieces of an arrow file: (first batch, end batch, bytes) runs of ~chunk_bytes (readers.plan_units)."""
    ranges, start, size, count = [], 0, 0, 0
    for count, batch in enumerate(_batches(path), 1):
        size += batch.nbytes
        if size >= chunk_bytes:
            ranges.append((start, count, size))
            start, size = count, 0
    if start < count or not ranges:
        ranges.append((start, count, size))
    return ranges


def arrow_records(piece: Piece, stats: ReadStats, fields: list[tuple[str, str]], max_bytes: int | None = None
                  ) -> Iterator[tuple[int, object]]:
    """(row number within the piece, record) for the record batches [piece.start, piece.end) of an arrow file
    (all of it when piece.end < 0); a ClassLabel label column's ids come out as its names. A string value over
    `max_bytes` makes the record a record_too_large BadRecord (as for parquet)."""
    columns, _, class_labels = _column_info(piece.path)
    split = split_of(piece.path)
    for field, flag in fields:
        if field not in columns:
            shown = ", ".join(repr(c) for c in columns[:20]) or "none"
            raise DataError(f"{split.label()}: no column {field!r} (columns: {shown}); pass {flag} with the column "
                            "that holds it")
    names = list(dict.fromkeys(f for f, _ in fields))
    label_names = next((class_labels.get(f) for f, flag in fields if flag == "--label-field"), None)
    label_field = next((f for f, flag in fields if flag == "--label-field"), None)
    start, end = (piece.start, piece.end) if piece.end >= 0 else (0, None)
    number = 0
    for index, batch in enumerate(_batches(piece.path)):
        if index < start:
            continue
        if end is not None and index >= end:
            break
        batch = batch.select(names)
        stats.bytes_read += batch.nbytes  # whole batches: the count does not depend on how units were cut
        for offset in range(0, batch.num_rows, READ_ROWS):
            part = batch.slice(offset, READ_ROWS)
            values = [part.column(i).to_pylist() for i in range(len(names))]
            for row in zip(*values):
                number += 1
                if max_bytes is not None:
                    sizes = [len(v.encode("utf-8", "surrogatepass")) for v in row
                             if isinstance(v, str) and len(v) > max_bytes // 4]
                    if sizes and max(sizes) > max_bytes:
                        yield number, too_large(max(sizes), max_bytes, "a value")
                        continue
                record = dict(zip(names, row))
                if label_names is not None:
                    value = record[label_field]
                    if isinstance(value, int):
                        if not 0 <= value < len(label_names):
                            missing = " (-1 marks a missing label, as in unlabelled test splits)" if value == -1 \
                                else ""
                            yield number, BadRecord("unknown_label", f"label {value} is not an id of the dataset's "
                                                    f"ClassLabel names ({', '.join(label_names[:10])}){missing}; "
                                                    "fix the record, or skip such records with --on-bad-record skip")
                            continue
                        record[label_field] = label_names[value]
                yield number, record


def location(piece: Piece, number: int) -> str:
    """DATASET['split'][row] (DIR[row] for a plain Dataset) of record `number` of the piece; rows 0-based, as
    `datasets` indexes them."""
    split = split_of(piece.path)
    row = 0
    for path in split.files:
        if path == piece.path:
            break
        row += num_rows(path)
    if piece.end >= 0:
        for index, batch in enumerate(_batches(piece.path)):
            if index >= piece.start:
                break
            row += batch.num_rows
    return f"{split.label()}[{row + number - 1}]"
