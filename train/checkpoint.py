"""Save and restore everything a run needs to continue exactly where it stopped.

Layout under `<run>/checkpoints/`:
- `step_<N>/`: DeepSpeed's model + optimizer files (our client state inside), `rng_rank<R>.pt` per rank, and
  `checkpoint.json` (step, world size, config fingerprint, every file with its size).
- `latest`: the name of the newest complete checkpoint.
- `best`: the name of the checkpoint with the best validation metric (`train.best_metric`), if tracked; retention
  never deletes it.

A save goes to `step_<N>.partial/`; after every rank has finished writing (barrier) rank 0 writes
`checkpoint.json`, renames the directory to `step_<N>` and only then points `latest` at it (temp file + rename). A run
killed at any moment of a save therefore leaves the previous checkpoint as `latest`. Before loading, a checkpoint's
files are checked against its `checkpoint.json`; a missing or truncated file makes it skipped, with a warning, in
favour of the newest older one that checks out.

Checkpoint files are pickles: they are only ever loaded from the run directory the user named, after this check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train import faults
from train.errors import ResumeError
from train.rng import load_rng_state, rng_state

LATEST = "latest"
BEST = "best"
MANIFEST = "checkpoint.json"
_TAG = re.compile(r"step_(\d+)")


def tag_for(step: int) -> str:
    return f"step_{step}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files_with_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def verify(directory: Path) -> str | None:
    """None if the checkpoint directory is complete, else why not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        return f"{MANIFEST} is not valid JSON ({exc})"
    for name, size in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST} records {size}"
    return None


class Checkpointer:
    def __init__(self, directory: Path, rank: int, keep_last: int = 0, keep_every: int = 0):
        self.directory = Path(directory)
        self.rank = rank
        self.keep_last = keep_last
        self.keep_every = keep_every

    def steps_on_disk(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir()
                      if p.is_dir() and (m := _TAG.fullmatch(p.name)))

    def find_latest(self) -> tuple[str, dict] | None:
        """(tag, checkpoint.json) of the newest checkpoint that checks out, or None. Checkpoints newer than
        `latest` are not considered: `latest` is only moved once a save is complete."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        latest = _TAG.fullmatch(pointer.read_text().strip())
        newest = int(latest.group(1)) if latest else max(self.steps_on_disk(), default=-1)
        for step in sorted((s for s in self.steps_on_disk() if s <= newest), reverse=True):
            path = self.directory / tag_for(step)
            problem = verify(path)
            if problem is None:
                return tag_for(step), json.loads((path / MANIFEST).read_text())
            if self.rank == 0:
                print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
        return None

    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it. `meta` goes into checkpoint.json."""
        tag = tag_for(step)
        staging, final = self.directory / f"{tag}.partial", self.directory / tag
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left by a run killed mid-save
        dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=staging.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), staging / f"rng_rank{self.rank}.pt")
        faults.inject("in_save", step, self.rank)
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            manifest = {"step": step, **meta, "files": _files_with_sizes(staging)}
            write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
            if final.exists():
                shutil.rmtree(final)  # the same step saved again (a run resumed from an older checkpoint)
            os.rename(staging, final)
            write_atomic(self.directory / LATEST, tag.encode())
            self._apply_retention(newest=step)
        dist.barrier()
        return final

    def mark_best(self, step: int) -> None:
        """Point `best` at checkpoint `step` (rank 0 writes; call after its save returned)."""
        if self.rank == 0:
            write_atomic(self.directory / BEST, tag_for(step).encode())

    def best_tag(self) -> str | None:
        pointer = self.directory / BEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def _apply_retention(self, newest: int) -> None:
        """Keep the last `keep_last` checkpoints (0 keeps all), every multiple of `keep_every`, the best and the
        newest."""
        if not self.keep_last:
            return
        steps = self.steps_on_disk()
        best = _TAG.fullmatch(self.best_tag() or "")
        keep = set(steps[-self.keep_last:]) | {newest} | ({int(best.group(1))} if best else set())
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.directory / tag_for(step), ignore_errors=True)

    def load_weights(self, engine, tag: str) -> None:
        """Only the model weights of checkpoint `tag` (e.g. the best one, to evaluate it on the test split)."""
        load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag, load_module_only=True,
                                              load_optimizer_states=False, load_lr_scheduler_states=False)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")

    def load(self, engine, load_tag: str, rng_tag: str) -> dict:
        """Restore the engine from `load_tag` (the checkpoint, or its universal conversion) and this rank's RNG
        from checkpoint `rng_tag`; return the client state."""
        load_path, client_state = engine.load_checkpoint(str(self.directory), tag=load_tag)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.directory / load_tag}")
        rng_path = self.directory / rng_tag / f"rng_rank{self.rank}.pt"
        if rng_path.is_file():
            load_rng_state(torch.load(rng_path, weights_only=False))
        else:  # this rank did not exist when the checkpoint was written (resume on more ranks)
            print(f"warning: {rng_path} does not exist; rank {self.rank} keeps its freshly seeded RNG",
                  file=sys.stderr, flush=True)
        return client_state
