"""Blends: several shard directories sampled in proportion to weights (pure numpy; training builds on this).

Spec file: one `<shard directory>: <weight>` per line (`#` comments and blank lines ignored; a relative directory is
relative to the spec file), or a JSON object {"dir": weight, ...}. `load_blend` checks every part: it must be a
finished shard directory with the split, and all parts must share the tokenizer (fingerprint, vocab size, eos id,
dtype) and the record kind, otherwise the blend is refused.

`BlendSampler` maps a global sample index i to (part, shard, item) deterministically from (seed, i) alone, so any
rank can compute any sample and resuming is O(1): part = the weight bucket hit by u1 = hash(seed, 2i), item =
floor(u2 * items_in_part) with u2 = hash(seed, 2i+1), using splitmix64. Items are `seq_len` windows of each shard
(text; as train/data.py cuts them) or documents (seq_len=None; sft, classification). Over n samples the realised
share of part p is weight_p / sum(weights) within a few sqrt(p(1-p)/n).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.shards import ShardSet
from data_prep.splits import splitmix64

BOUND_KEYS = ("fingerprint", "vocab_size", "eos_id")


def parse_blend(path: str | Path) -> list[tuple[str, float]]:
    """[(directory, weight)] from a spec file; DataError naming file:line for a malformed entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read blend spec ({exc.strerror})") from None
    entries: list[tuple[str, object, str]] = []
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        entries = [(k, v, f"{path}: entry {k!r}") for k, v in data.items()]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            directory, sep, weight = line.rpartition(":")
            if not sep or not directory.strip():
                raise DataError(f"{path}:{number}: expected `<shard directory>: <weight>`, got {line!r}")
            entries.append((directory.strip(), weight.strip(), f"{path}:{number}"))
    out, seen = [], set()
    for directory, weight, where in entries:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise DataError(f"{where}: weight {weight!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise DataError(f"{where}: weight {weight!r} must be a finite number > 0")
        full = str(path.parent / directory) if not Path(directory).is_absolute() else directory
        if full in seen:
            raise DataError(f"{where}: {directory} is listed twice")
        seen.add(full)
        out.append((full, value))
    if not out:
        raise DataError(f"{path}: the blend spec lists no shard directories")
    return out


def load_blend(path: str | Path, split: str = "train") -> tuple[list[ShardSet], np.ndarray]:
    """(ShardSets, normalised weights) of a validated blend spec."""
    entries = parse_blend(path)
    sets = [ShardSet(directory, split) for directory, _ in entries]
    first = sets[0].manifest
    for shards in sets[1:]:
        m = shards.manifest
        for key in BOUND_KEYS:
            if m["tokenizer"].get(key) != first["tokenizer"].get(key):
                raise DataError(f"{path}: {shards.directory} was made with another tokenizer than {sets[0].directory}"
                                f" (tokenizer {key} {m['tokenizer'].get(key)!r} != {first['tokenizer'].get(key)!r});"
                                " re-tokenize it with the same tokenizer")
        for key in ("dtype", "record_kind"):
            if m.get(key) != first.get(key):
                raise DataError(f"{path}: {shards.directory} has {key} {m.get(key)!r} but {sets[0].directory} has "
                                f"{first.get(key)!r}; a blend mixes one kind of shards")
    weights = np.asarray([w for _, w in entries], dtype=np.float64)
    return sets, weights / weights.sum()


def _uniform(seed: int, stream: np.ndarray) -> np.ndarray:
    mixed = splitmix64(np.asarray(stream, dtype=np.uint64) ^ splitmix64(np.asarray([seed], dtype=np.uint64))[0])
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


class BlendSampler:
    """Deterministic weighted sampler over the items (windows or documents) of several ShardSets."""

    def __init__(self, sets: list[ShardSet], weights, seq_len: int | None = None, seed: int = 0):
        self.sets, self.seq_len, self.seed = sets, seq_len, int(seed)
        weights = np.asarray(weights, dtype=np.float64)
        self.weights = weights / weights.sum()
        self.cum = np.cumsum(self.weights)
        self.cum[-1] = 1.0
        self.starts = []  # per part: item index where each shard starts (+ total at the end)
        for shards in sets:
            if seq_len is not None:
                per_shard = np.asarray(shards.shard_num_tokens, dtype=np.int64) // seq_len
            else:
                per_shard = np.asarray(shards.shard_num_docs, dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(per_shard)])
            if starts[-1] == 0:
                what = f"no {seq_len}-token window" if seq_len is not None else "no documents"
                raise DataError(f"{shards.directory}: split {shards.split!r} has {what}; drop it from the blend")
            self.starts.append(starts)
        self.items = np.asarray([s[-1] for s in self.starts], dtype=np.int64)

    def sample(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(part, shard, item within the shard) for each global sample index. Text: the item is a window, whose
        tokens are shards.tokens(shard)[item * seq_len:(item + 1) * seq_len]; else a document index."""
        indices = np.asarray(indices, dtype=np.uint64)
        part = np.searchsorted(self.cum, _uniform(self.seed, indices * np.uint64(2)), side="right")
        part = np.minimum(part, len(self.sets) - 1)
        item = np.floor(_uniform(self.seed, indices * np.uint64(2) + np.uint64(1)) * self.items[part]).astype(np.int64)
        shard = np.empty_like(item)
        local = np.empty_like(item)
        for p in range(len(self.sets)):
            sel = part == p
            s = np.searchsorted(self.starts[p], item[sel], side="right") - 1
            shard[sel], local[sel] = s, item[sel] - self.starts[p][s]
        return part, shard, local

    def realised(self, num_samples: int, chunk: int = 1 << 20) -> np.ndarray:
        """Share of each part among samples 0 .. num_samples-1."""
        counts = np.zeros(len(self.sets), dtype=np.int64)
        for first in range(0, num_samples, chunk):
            idx = np.arange(first, min(first + chunk, num_samples), dtype=np.uint64)
            part = np.minimum(np.searchsorted(self.cum, _uniform(self.seed, idx * np.uint64(2)), side="right"),
                              len(self.sets) - 1)
            counts += np.bincount(part, minlength=len(self.sets))
        return counts / max(num_samples, 1)


def report(spec: str | Path, split: str = "train", seq_len: int = 2048, samples: int = 1_000_000, seed: int = 0
           ) -> str:
    sets, weights = load_blend(spec, split)
    text = sets[0].manifest.get("record_kind") == "text"
    sampler = BlendSampler(sets, weights, seq_len if text else None, seed)
    realised = sampler.realised(samples)
    unit = f"{seq_len}-token windows" if text else "documents"
    lines = [f"blend {spec}: {len(sets)} parts, split {split}, tokenizer {sets[0].manifest['tokenizer']['fingerprint'][:12]}"
             f", {samples:,} samples of {unit}"]
    for shards, w, r, n in zip(sets, weights, realised, sampler.items):
        epochs = r * samples / n
        lines.append(f"  {shards.directory}: weight {w:.4f}, realised {r:.4f}, {n:,} {unit}, {epochs:.2f} epochs")
    return "\n".join(lines)
