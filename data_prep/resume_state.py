"""Resuming `tokenize`: the key of a run, whether its output is already finished, and `.parts/state.json`.

The key is a hash of everything the output depends on. A finished output whose manifest `prep.key` equals it and
which is newer than every input is left alone. state.json binds the parts under `.parts/` to one run: it holds the
run's part key (which every part's meta repeats) and what assembly needs; a re-run with other inputs or arguments
starts over there, and the tasks of an array job agree on one state file or stop.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data_prep.errors import DataError
from data_prep.files import write_atomic
from data_prep.manifest import MANIFEST_NAME, load_manifest
from data_prep.parts import PART_VERSION
from data_prep.progress import log
from data_prep.records import RecordSpec
from data_prep.splits import SplitSpec

STATE_NAME = "state.json"


def input_stats(files: list[str]) -> list[list]:
    """[path, size, modification time in ns] per input: an input edited in place, even at the same size, gets
    another key, so its stale parts are never reused (a resume starts over, see `ensure_state`)."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DataError(f"{f}: cannot be read ({exc.strerror})") from None
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def run_key(files: list[str], fingerprint: str, spec: RecordSpec, splits: SplitSpec, shard_tokens: int,
            eos_token: str | None = None) -> str:
    """sha256 of everything the output depends on: input paths, sizes and modification times, tokenizer (and the
    eos named for it), record spec, splits, sharding."""
    desc = {"inputs": input_stats(files), "tokenizer": fingerprint, "record": spec.as_dict(),
            "splits": splits.as_dict(), "shard_tokens": shard_tokens, "format": PART_VERSION}
    if eos_token is not None:  # absent otherwise: keys of runs without --eos-token stay what they were
        desc["eos_token"] = eos_token
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def finished_manifest(output: Path, key: str, files: list[str]) -> dict | None:
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


def state_path(parts: Path) -> Path:
    return parts / STATE_NAME


def load_state(parts: Path) -> dict:
    return json.loads(state_path(parts).read_text(encoding="utf-8"))


def _changed_input(old: list | None, new: list) -> str | None:
    """The first input of `new` whose size or modification time differs from `old` (same path), or None."""
    before = {f: (size, mtime) for f, size, mtime in old or []}
    for f, size, mtime in new:
        if f in before and before[f] != (size, mtime):
            return f
    return None


def ensure_state(parts: Path, state: dict, num_tasks: int) -> None:
    """Create .parts/state.json, or check that the existing one is this run's; a single task restarts a stale one."""
    parts.mkdir(parents=True, exist_ok=True)
    path = state_path(parts)
    # Written whole under a name of this process's own, then linked to state.json: an atomic create-if-absent, so
    # that concurrent array tasks agree on one state file.
    candidate = parts / f".{STATE_NAME}.{os.getpid()}"
    write_atomic(candidate, json.dumps(state, indent=1))
    try:
        os.link(candidate, path)
    except FileExistsError:
        try:
            existing = load_state(parts)
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("part_key") != state["part_key"]:
            changed = _changed_input(existing.get("inputs"), state["inputs"])
            why = (f"input {changed} changed (size or modification time) since they were written" if changed
                   else "other inputs or arguments")
            if num_tasks > 1:
                raise DataError(f"{parts}: holds parts of a different run ({why}); remove {parts} and re-run every "
                                "task of the array job") from None
            log(f"{parts}: parts of a different run found ({why}); starting over")
            for p in parts.iterdir():
                if p != candidate:
                    p.unlink()
            os.link(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)
