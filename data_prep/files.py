"""Writing files and directories so that a reader never sees them half-written: the one place that does it.

Everything goes to a temporary name beside its target (same file system, so the final rename is atomic) and is
renamed into place only when complete; a failure (a full disk, Ctrl-C) removes the temporary and leaves the
previous version, if any, untouched. `train` uses these too (it may import data_prep; never the reverse).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import IO, Iterator


def _temp_beside(path: Path) -> Path:
    # The pid keeps two processes writing the same target (two ranks, a rerun) off each other's temporary.
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary beside `path` for writing; on a clean exit fsync it and rename it to `path`."""
    path = Path(path)
    tmp = _temp_beside(path)
    tmp.unlink(missing_ok=True)
    # O_EXCL | O_NOFOLLOW: never write through a symbolic link planted at the temporary's name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> str:
    """Write `data` (str as UTF-8) to `path` atomically; returns its sha256 (hex)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path) as f:
        f.write(raw)
    return hashlib.sha256(raw).hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on a clean exit it replaces `path` (whose previous
    contents are moved aside first: a directory cannot be renamed over a non-empty one, then deleted)."""
    path = Path(path)
    tmp = _temp_beside(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
