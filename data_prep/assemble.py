"""Assembly: the parts of a run -> shards + manifest.json, and what an output directory may hold.

The parts are read in unit order; each document gets its split by its ordinal (`splits.SplitSpec`), or by the
split of its unit with --splits-from-input, and is appended to that split's shard writer. manifest.json is written
last and `.parts/` removed, so shards and manifest depend only on the inputs, the tokenizer and the arguments that
shape the output. Memory stays at one part at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.manifest import MANIFEST_NAME, build_manifest, write_manifest
from data_prep.parts import PARTS_DIR, part_done, read_meta, read_part
from data_prep.pieces import ReadStats
from data_prep.records import MAX_UNDECLARED_LABELS, RecordSpec
from data_prep.resume_state import load_state
from data_prep.shards import ShardWriter
from data_prep.splits import SPLITS, SplitSpec

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


def _clear_output_dir(output: Path) -> None:
    """Clear a previous run's shards from `output` (keeping the parts); refuse to delete anything else."""
    check_output_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    ours = [p for p in output.iterdir() if p.is_file() and _is_ours(p.name)]
    # The manifest goes first: from here on the directory is visibly incomplete until the new manifest lands.
    for path in sorted(ours, key=lambda p: p.name != MANIFEST_NAME):
        path.unlink()


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
    """Assemble the finished parts under `output/.parts/` into shards + manifest.json; returns the manifest."""
    parts = output / PARTS_DIR
    state = load_state(parts)
    n = state["num_units"]
    missing = [i for i in range(n) if not part_done(parts, i, state["part_key"])]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{output}: {len(missing)} of {n} units have no finished part (units {shown}); unit u "
                        "belongs to --task-id u % --num-tasks: re-run those tasks, then merge")
    metas = [read_meta(parts, i) for i in range(n)]
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
    label_names, label_maps = _label_table(metas, spec) if with_labels else (None, [None] * n)
    dtype = np.dtype(state["dtype"])
    _clear_output_dir(output)
    unit_splits = state.get("unit_splits")  # --splits-from-input: the split of every unit
    names = splits.split_names() if unit_splits is None else ["train"] + [
        SPLITS[c] for c in sorted(set(unit_splits) - {0})]
    writers = {s: ShardWriter(output, s, dtype, state["shard_tokens"], with_mask, with_labels) for s in names}
    mask_tokens = dict.fromkeys(names, 0)
    label_counts = {s: np.zeros(len(label_names or []), dtype=np.int64) for s in names}
    ordinal = 0
    try:
        for i, meta in enumerate(metas):
            tokens, lengths, mask, labels = read_part(parts, i, meta, dtype, with_mask, label_maps[i])
            assign = splits.assign(ordinal, len(lengths), thresholds) if unit_splits is None else np.full(
                len(lengths), unit_splits[i], dtype=np.uint8)
            ordinal += len(lengths)
            for code in np.unique(assign):
                split = SPLITS[int(code)]
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
