"""`demo-corpus`: a jsonl corpus that needs no download, from the source of Python's own standard library.

One document per stdlib `.py` file, in sorted path order, until `max_mb` MB (10**6 bytes) of UTF-8 text are
written, so the result is deterministic for a given Python install. Installed packages (site-packages,
dist-packages) are excluded so they cannot change it; files that are not valid UTF-8 (a few encoding tests) are
skipped.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from data_prep.errors import DataError
from data_prep.progress import log

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def write_demo_corpus(output: str | Path, max_mb: float = 8.0) -> tuple[int, int]:
    """Write the corpus (atomically); returns (documents, bytes of text)."""
    if max_mb <= 0:
        raise DataError(f"--max-mb {max_mb} must be > 0")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    limit = int(max_mb * 1e6)
    docs = written = 0
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in stdlib_files():
            if written >= limit:
                break
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue  # many empty __init__.py files; they would only be dropped later
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            docs += 1
            written += len(text.encode("utf-8"))
    if docs == 0:
        tmp.unlink()
        raise DataError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
    os.replace(tmp, output)
    log(f"demo-corpus: {docs:,} documents, {written / 1e6:.1f} MB of text -> {output}")
    return docs, written
