"""Save and restore everything a run needs to continue exactly where it stopped.

Layout under `<run>/checkpoints/`:
- `step_<N>/`: DeepSpeed's model + optimizer files (our client state inside), `rng_rank<R>.pt` per rank, and
  `checkpoint.json` (step, world size, config fingerprint, every file with its size and xxh3-128 checksum).
- `latest`: the name of the newest complete checkpoint.
- `best`: the name of the checkpoint with the best validation metric (`eval.best_metric`), if tracked; retention
  never deletes it.

A save goes to `step_<N>.partial/`; after every rank has finished writing (barrier) the ranks hash the files (each a
share of them), rank 0 writes `checkpoint.json`, renames the directory to `step_<N>` and only then points `latest` at
it (temp file + rename). A run killed at any moment of a save therefore leaves the previous checkpoint as `latest`.

Checkpoint files are pickles, so nothing is loaded before `verify` passed (see docs/security.md):
- a checkpoint name (`latest`, `best`, `--step`) is `step_<N>` and nothing else, so a checkpoint is always a direct
  child of `<run>/checkpoints/`; a pointer file holding anything else is an error (`best`) or ignored with a warning
  in favour of the newest checkpoint on disk that checks out (`latest`);
- the checkpoint directory, the pointer files and every file inside are no symbolic links (and are regular files);
- every file is listed in `checkpoint.json` with its size and checksum and nothing else is in the directory.
A checkpoint that fails this is skipped, with a warning naming the file, in favour of the newest older one that
checks out. The checksums catch corruption (a bad disk, a truncated copy), not an attacker: whoever can write the
run directory can rewrite `checkpoint.json` as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash

from data_prep import faults
from data_prep.files import write_atomic
from train.errors import ResumeError
from train.rng import load_rng_state, rng_state

LATEST = "latest"
BEST = "best"
MANIFEST = "checkpoint.json"
CHECKSUM = "xxh3_128"  # checkpoint.json key: {file: hex digest}
UNIVERSAL = ".universal"  # suffix of a checkpoint converted to DeepSpeed's universal format (train.resume)
_TAG = re.compile(r"step_(0|[1-9]\d*)")
_LOADABLE = re.compile(r"step_(0|[1-9]\d*)(\.universal)?")
_CHUNK = 16 << 20


def tag_for(step: int) -> str:
    return f"step_{step}"


def parse_tag(text: str) -> int | None:
    """N for exactly `step_<N>` (no sign, no leading zeros, nothing around it), else None."""
    match = _TAG.fullmatch(text)
    return int(match.group(1)) if match else None


def file_checksum(path: Path) -> str:
    """xxh3-128 of the file's bytes (hex); refuses to follow a symbolic link."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _collective() -> tuple[int, int] | None:
    """(rank, world size) when the ranks share the hashing, else None (a single process: export, predict)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _checksums(directory: Path, names: list[str], collective: bool) -> dict[str, str]:
    """{name: checksum} for `names` (relative to directory); with `collective`, every rank hashes a share and all
    ranks get the whole dict (every rank must call it, with the same names)."""
    group = _collective() if collective else None
    rank, world = group or (0, 1)
    mine = {name: file_checksum(directory / name) for name in names[rank::world]}
    if group is None:
        return mine
    shares: list = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: digest for share in shares for name, digest in share.items()}


def _tree(directory: Path) -> tuple[list[str], str | None]:
    """(the regular files below directory, relative and sorted; the first problem: a symbolic link or a special
    file on the way). Links are never followed."""
    files, problem = [], None
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in sorted(dirs) + sorted(names):
            path = Path(root, name)
            rel = str(path.relative_to(directory))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                problem = problem or f"{rel} is a symbolic link (checkpoints are read only from inside the run directory)"
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                problem = problem or f"{rel} is not a regular file"
    return sorted(files), problem


def _structure(directory: Path) -> tuple[list[str], str | None]:
    """(files, problem) of a checkpoint directory: it must be a real directory named like a checkpoint, with no
    link or special file inside."""
    if not _LOADABLE.fullmatch(directory.name):
        return [], f"{directory.name!r} is not a checkpoint name (step_<N>)"
    if directory.is_symlink():
        return [], "it is a symbolic link (checkpoints are read only from inside the run directory)"
    if not directory.is_dir():
        return [], "it is not a directory"
    return _tree(directory)


def verify(directory: Path, collective: bool = False) -> str | None:
    """None if the checkpoint directory is complete and intact, else why not (naming the file). With
    `collective`, every rank must call it: the ranks share the hashing and all return the same answer."""
    directory = Path(directory)
    files, problem = _structure(directory)
    manifest = None
    if problem is None:
        if MANIFEST not in files:
            problem = f"no {MANIFEST} (the save did not finish)"
        else:
            try:
                manifest = json.loads((directory / MANIFEST).read_text())
                recorded = manifest["files"]
                if not isinstance(recorded, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                problem = f"{MANIFEST} is not a valid checkpoint manifest ({exc or 'no files'})"
    if problem is None:
        on_disk = set(files) - {MANIFEST}
        for name, size in recorded.items():
            if name not in on_disk:
                problem = f"{name} is missing"
                break
            if os.lstat(directory / name).st_size != size:
                problem = f"{name} has {os.lstat(directory / name).st_size} bytes, {MANIFEST} records {size}"
                break
        else:
            extra = sorted(on_disk - set(recorded))
            if extra:
                problem = f"{extra[0]} is not recorded in {MANIFEST}"
    checksums = (manifest or {}).get(CHECKSUM) if problem is None else None
    names = sorted(checksums) if isinstance(checksums, dict) else []
    if problem is None and isinstance(checksums, dict) and set(checksums) != set(recorded):
        problem, names = f"{MANIFEST} records checksums for other files than it lists", []
    if collective and _collective():
        # Every rank takes part in exactly one gather whatever it found, so a rank that sees a different file
        # system state cannot leave the others waiting.
        rank, world = _collective()
        mine = problem or next((f"{n}: content differs from its checksum in {MANIFEST}" for n in names[rank::world]
                                if file_checksum(directory / n) != checksums[n]), None)
        answers: list = [None] * world
        dist.all_gather_object(answers, mine)
        return next((a for a in answers if a), None)
    if problem is None:
        problem = next((f"{n}: content differs from its checksum in {MANIFEST}" for n in names
                        if file_checksum(directory / n) != checksums[n]), None)
    return problem


def has_checksums(manifest: dict) -> bool:
    return isinstance(manifest.get(CHECKSUM), dict)


def write_manifest(directory: Path, meta: dict, collective: bool = False) -> dict:
    """Record every file of `directory` with its size and checksum in its checkpoint.json (with `collective`, every
    rank calls it and hashes a share; rank 0 writes). Returns the manifest (on rank 0; {} on the others)."""
    group = _collective() if collective else None
    names = [_tree(directory)[0]] if group is None or group[0] == 0 else [None]
    if group:
        dist.broadcast_object_list(names, src=0)
    names = [n for n in names[0] if n != MANIFEST]
    checksums = _checksums(directory, names, collective)
    if group is not None and group[0] != 0:
        return {}  # rank 0 may be renaming the directory already
    manifest = {**meta, "files": {n: os.lstat(directory / n).st_size for n in names},
                CHECKSUM: {n: checksums[n] for n in names}}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def remove(path: Path) -> None:
    """Delete a checkpoint directory; a symbolic link in its place is removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    def __init__(self, directory: Path, rank: int, keep_last: int = 0, keep_every: int = 0):
        self.directory = Path(directory)
        self.rank = rank
        self.keep_last = keep_last
        self.keep_every = keep_every

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def steps_on_disk(self) -> list[int]:
        """Steps of the entries named step_<N> (links and files too: verify rejects them, with a warning)."""
        if not self.directory.is_dir():
            return []
        return sorted(step for p in self.directory.iterdir() if (step := parse_tag(p.name)) is not None)

    def pointer(self, name: str) -> tuple[str | None, str | None]:
        """(tag, None) for a valid pointer file (`latest`, `best`), (None, None) when there is none, (None, why) when
        it cannot be used."""
        path = self.directory / name
        if path.is_symlink():
            return None, f"{path} is a symbolic link"
        if not path.exists():
            return None, None
        if not path.is_file():
            return None, f"{path} is not a regular file"
        with open(path, "rb") as f:
            text = f.read(64).decode(errors="replace").strip()
        if parse_tag(text) is None:
            return None, f"{path} holds {text!r}, not a checkpoint name (step_<N>)"
        return text, None

    def find_latest(self) -> tuple[str, dict] | None:
        """(tag, checkpoint.json) of the newest checkpoint that checks out, or None. Checkpoints newer than
        `latest` are not considered: `latest` is only moved once a save is complete. Collective when a process
        group is up (every rank calls it; they share the hashing)."""
        latest, problem = self.pointer(LATEST)
        if latest is None and problem is None:
            return None
        if problem:
            self._warn(f"ignoring {problem}; resuming from the newest checkpoint on disk that checks out")
        newest = parse_tag(latest) if latest else float("inf")
        for step in sorted((s for s in self.steps_on_disk() if s <= newest), reverse=True):
            path = self.directory / tag_for(step)
            problem = verify(path, collective=True)
            if problem is None:
                manifest = json.loads((path / MANIFEST).read_text())
                if not has_checksums(manifest):
                    self._warn(f"checkpoint {path} records no checksums (written by an older version); only its "
                               "file sizes were checked")
                return tag_for(step), manifest
            self._warn(f"skipping checkpoint {path}: {problem}")
        return None

    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it. `meta` goes into checkpoint.json."""
        tag = tag_for(step)
        staging, final = self.directory / f"{tag}.partial", self.directory / tag
        if self.rank == 0 and (staging.exists() or staging.is_symlink()):
            remove(staging)  # left by a run killed mid-save
        dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=staging.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), staging / f"rng_rank{self.rank}.pt")
        if faults.ACTIVE:
            faults.at_step("in_save", step, self.rank)
        dist.barrier()  # every rank's files are on disk
        write_manifest(staging, {"step": step, **meta}, collective=True)
        if self.rank == 0:
            if final.exists() or final.is_symlink():
                remove(final)  # the same step saved again (a run resumed from an older checkpoint)
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
        """The checkpoint `best` names, None without one; ResumeError for a pointer that is not a checkpoint name."""
        tag, problem = self.pointer(BEST)
        if problem:
            raise ResumeError(f"{problem}; refusing to load it (the trainer writes it; restore or delete it)")
        return tag

    def _apply_retention(self, newest: int) -> None:
        """Keep the last `keep_last` checkpoints (0 keeps all), every multiple of `keep_every`, the best and the
        newest."""
        if not self.keep_last:
            return
        steps = self.steps_on_disk()
        best = self.pointer(BEST)[0]
        keep = set(steps[-self.keep_last:]) | {newest} | ({parse_tag(best)} if best else set())
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                remove(self.directory / tag_for(step))

    def checked(self, tag: str) -> Path:
        """The directory of checkpoint `tag` (`step_<N>` or its `.universal` conversion) after the structural checks
        (a real directory directly in checkpoints/, no link inside); ResumeError otherwise. The contents were
        verified by find_latest (or the conversion) just before."""
        if not _LOADABLE.fullmatch(tag):
            raise ResumeError(f"{tag!r} is not a checkpoint name (step_<N>)")
        path = self.directory / tag
        problem = _structure(path)[1]
        if problem is None and path.resolve().parent != self.directory.resolve():
            problem = "it resolves outside the checkpoints directory"
        if problem:
            raise ResumeError(f"refusing to load checkpoint {path}: {problem}")
        return path

    def load_weights(self, engine, tag: str) -> None:
        """Only the model weights of checkpoint `tag` (e.g. the best one, to evaluate it on the test split), after
        verifying it. Collective."""
        path = self.checked(tag)
        problem = verify(path, collective=True)
        if problem:
            raise ResumeError(f"cannot load checkpoint {path}: {problem}")
        load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag, load_module_only=True,
                                              load_optimizer_states=False, load_lr_scheduler_states=False)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {path}")

    def load(self, engine, load_tag: str, rng_tag: str) -> dict:
        """Restore the engine from `load_tag` (the checkpoint, or its universal conversion) and this rank's RNG
        from checkpoint `rng_tag`; return the client state. Both were verified just before (find_latest,
        train.resume.convert_to_universal); here they are only checked to still be real directories."""
        load_dir = self.checked(load_tag)
        rng_path = self.checked(rng_tag) / f"rng_rank{self.rank}.pt"
        load_path, client_state = engine.load_checkpoint(str(self.directory), tag=load_tag)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {load_dir}")
        if rng_path.is_file() and not rng_path.is_symlink():
            load_rng_state(torch.load(rng_path, weights_only=False))
        else:  # this rank did not exist when the checkpoint was written (resume on more ranks)
            print(f"warning: {rng_path} does not exist; rank {self.rank} keeps its freshly seeded RNG",
                  file=sys.stderr, flush=True)
        return client_state
