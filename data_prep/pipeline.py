"""`tokenize`: stream documents -> token ids in batches -> eos-separated shards per split -> manifest.json.

Memory stays at one batch: documents are read lazily, encoded `batch_size` at a time, split into train/val with a
mask (no per-token Python loop) and appended to the shard writers. The manifest is written last, so an
interrupted run leaves a directory without one, which `ShardSet` and `verify` refuse.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_prep.backend import TokenizerBackend
from data_prep.errors import DataError
from data_prep.manifest import MANIFEST_NAME, build_manifest, write_manifest
from data_prep.progress import Progress, log
from data_prep.readers import ReadStats, expand_inputs, iter_documents
from data_prep.shards import ShardWriter, dtype_for_vocab
from data_prep.splits import val_mask

# gigatoken is trusted once it matches tokenizers on the first SAMPLE_DOCS documents, or on fewer if those
# already hold SAMPLE_CHARS characters (the reference encode costs ~1 s per MB, paid once at start-up).
SAMPLE_DOCS = 200
SAMPLE_CHARS = 1_000_000


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _take_sample(docs: Iterator[str]) -> list[str]:
    sample, chars = [], 0
    for text in itertools.islice(docs, SAMPLE_DOCS):
        sample.append(text)
        chars += len(text)
        if chars >= SAMPLE_CHARS:
            break
    return sample


def _prepare_output_dir(output: Path) -> None:
    """Create `output`, or clear a previous run's shards from it; refuse to delete anything else."""
    output.mkdir(parents=True, exist_ok=True)
    ours = [p for p in output.iterdir() if p.is_file() and (
        p.name == MANIFEST_NAME or p.name.endswith((".bin", ".idx.npy")) or
        (p.name.startswith(".") and p.name.endswith(".tmp")))]
    others = sorted(p.name for p in output.iterdir() if p not in ours)
    if others:
        raise DataError(f"{output}: output directory holds files that are not shards ({', '.join(others[:5])}); "
                        "choose an empty or new --output")
    # The manifest goes first: from here on the directory is visibly incomplete until the new manifest lands.
    for path in sorted(ours, key=lambda p: p.name != MANIFEST_NAME):
        path.unlink()


def tokenize_corpus(inputs: list[str], tokenizer_dir: str | Path, output: str | Path, text_field: str = "text",
                    val_fraction: float = 0.0, shard_tokens: int = 50_000_000, batch_size: int = 1024,
                    backend: str | None = None) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the manifest written there."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1 or batch_size < 1:
        raise DataError("--shard-tokens and --batch-size must be >= 1")
    output = Path(output)
    files = expand_inputs(inputs)
    stats = ReadStats()
    docs = (doc.text for doc in iter_documents(files, text_field, stats))
    progress = Progress("tokenize")  # started here so the rate includes the backend check
    sample = _take_sample(docs)
    if not sample:
        raise DataError(f"the inputs hold no non-empty documents ({stats.docs_read} read, all empty)")
    encoder = TokenizerBackend(tokenizer_dir, sample, backend)
    log(f"backend {encoder.name} ({encoder.reason})")
    dtype = dtype_for_vocab(encoder.vocab_size)
    eos = encoder.special_ids["eos_id"]
    _prepare_output_dir(output)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    writers = {split: ShardWriter(output, split, dtype, shard_tokens) for split in splits}
    ordinal = 0  # of the next document, over the whole corpus: the split depends on it alone
    try:
        for texts in _batched(itertools.chain(sample, docs), batch_size):
            flat, lengths = encoder.encode_batch(texts)
            if flat.size and int(flat.max()) >= encoder.vocab_size:
                raise DataError(f"{tokenizer_dir}: the tokenizer produced id {int(flat.max())} >= its vocabulary "
                                f"size {encoder.vocab_size}; the tokenizer dir is inconsistent")
            tokens = np.insert(flat.astype(dtype), np.cumsum(lengths), eos)  # eos after every document
            lengths = lengths + 1
            is_val = val_mask(ordinal, len(texts), val_fraction)
            if is_val.any():
                token_is_val = np.repeat(is_val, lengths)
                writers["val"].add(tokens[token_is_val], lengths[is_val])
                writers["train"].add(tokens[~token_is_val], lengths[~is_val])
            else:
                writers["train"].add(tokens, lengths)
            ordinal += len(texts)
            progress.update(len(texts), stats.bytes_read, len(tokens))
        entries = {split: writer.close() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if val_fraction > 0 and ordinal < 2:
        raise DataError(f"--val-fraction {val_fraction} needs at least 2 documents, the inputs hold {ordinal}")
    if not entries["train"]:
        raise DataError(f"--val-fraction {val_fraction} left no training documents; lower it")
    manifest = build_manifest(tokenizer_dir=tokenizer_dir, vocab_size=encoder.vocab_size,
                              special_ids=encoder.special_ids, backend=encoder.name, dtype=dtype.name,
                              splits=entries, inputs=files, val_fraction=val_fraction, counts=stats.as_dict())
    write_manifest(output, manifest)
    summary = ", ".join(f"{s} {m['num_docs']:,} docs / {m['num_tokens']:,} tokens / {len(m['shards'])} shards"
                        for s, m in manifest["splits"].items())
    progress.finish(f", backend {encoder.name}; {summary}; dropped {stats.docs_empty_dropped:,} empty")
    return manifest
