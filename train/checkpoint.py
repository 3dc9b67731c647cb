"""Save and restore everything a run needs to continue exactly where it stopped.

Layout: `<run>/checkpoints/step_<N>/` holds DeepSpeed's model + optimizer files (with our client state inside),
plus `rng_rank<R>.pt` per rank; `<run>/checkpoints/latest` names the newest complete one. `latest` is written by
rank 0 only after every rank has finished writing (a barrier), atomically (temp file + rename), so a run killed
mid-save still resumes from the previous checkpoint.

Checkpoint files are pickles: they are only ever loaded from the run directory the user named.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from train.errors import ResumeError
from train.rng import load_rng_state, rng_state

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, directory: Path, engine, rank: int):
        self.directory = Path(directory)
        self.engine = engine
        self.rank = rank

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, step: int, client_state: dict) -> Path:
        tag = tag_for(step)
        # save_latest=False: DeepSpeed would write `latest` before our per-rank files exist.
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        rng_path = self.directory / tag / f"rng_rank{self.rank}.pt"
        tmp = rng_path.with_name(rng_path.name + ".tmp")
        torch.save(rng_state(), tmp)
        os.replace(tmp, rng_path)
        dist.barrier()
        if self.rank == 0:
            write_atomic(self.directory / LATEST, tag.encode())
        dist.barrier()
        return self.directory / tag

    def load(self) -> dict | None:
        """Restore engine + this rank's RNG from the latest checkpoint; return the client state, or None if the
        run has no checkpoint yet."""
        tag = self.latest_tag()
        if tag is None:
            return None
        rng_path = self.directory / tag / f"rng_rank{self.rank}.pt"
        if not rng_path.is_file():
            raise ResumeError(f"{rng_path} is missing: checkpoint {tag} was written by a run with fewer ranks "
                              "than this one")
        load_path, client_state = self.engine.load_checkpoint(str(self.directory), tag=tag)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")
        load_rng_state(torch.load(rng_path, weights_only=False))
        return client_state
