"""What checkpoint checksums cost: xxh3-128 over a checkpoint-like directory, as train.checkpoint hashes it.

    .venv/bin/python bench/checkpoint_checksum.py [--mb 256] [--files 6] [--workdir DIR] [--repeat 3]

Writes --files files of random bytes (--mb MB in all; the sizes of a ZeRO checkpoint: one large optimizer partition
per rank, a model-states file, small RNG files) into a `step_1/` directory, then times
- save side: `train.checkpoint.write_manifest` (list, stat and hash every file, write checkpoint.json), and
- load side: `train.checkpoint.verify` (structure, sizes, every checksum),
each --repeat times with the files in the page cache (they were just written, as at a save), and prints seconds and
MB/s (MB = 10^6 bytes) for each, plus the raw xxh3-128 speed on a buffer in memory. Reading a checkpoint cold from
disk is bounded by the disk instead; the hashing itself is the figure here. The directory is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash  # noqa: E402

from train import checkpoint as ckpt  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_flag(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


def make_checkpoint(directory: Path, total_mb: int, files: int) -> int:
    directory.mkdir(parents=True)
    total = total_mb * 10**6
    small = [("rng_rank0.pt", 15_000), ("rng_rank1.pt", 15_000)]
    big = total - sum(size for _, size in small)
    parts = max(1, files - len(small))
    sizes = [("mp_rank_00_model_states.pt", big // (parts * 4))]
    rest = big - sizes[0][1]
    sizes += [(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", rest // (parts - 1) if parts > 1 else rest)
              for r in range(max(1, parts - 1))]
    chunk = os.urandom(1 << 20)
    written = 0
    for name, size in small + sizes:
        with open(directory / name, "wb") as f:
            left = size
            while left:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        written += size
    return written


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="checkpoint size in MB (default 256; at least 100)")
    parser.add_argument("--files", type=int, default=6, help="number of files (default 6)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the median is printed")
    parser.add_argument("--workdir", default=None, help="where to write the directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.mb < 100:
        parser.error("--mb must be at least 100")
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.workdir))
    try:
        directory = root / "step_1"
        size = make_checkpoint(directory, args.mb, args.files)
        mb = size / 1e6
        save = timed(lambda: ckpt.write_manifest(directory, {"step": 1}), args.repeat)
        problem = ckpt.verify(directory)
        assert problem is None, problem
        load = timed(lambda: ckpt.verify(directory), args.repeat)
        buffer = os.urandom(64 << 20)
        raw = timed(lambda: xxhash.xxh3_128(buffer).hexdigest(), args.repeat)
        print(f"CPU: {cpu_model()} ({os.cpu_count()} cores, avx512_bf16: {'yes' if has_flag('avx512_bf16') else 'no'}"
              f", avx2: {'yes' if has_flag('avx2') else 'no'}); xxhash {xxhash.VERSION}")
        print(f"checkpoint: {len(list(directory.iterdir())) - 1} files, {mb:.1f} MB, in the page cache")
        print(f"save side (write_manifest: hash + checkpoint.json): {save:.3f} s, {mb / save:,.0f} MB/s")
        print(f"load side (verify: structure, sizes, checksums):     {load:.3f} s, {mb / load:,.0f} MB/s")
        print(f"raw xxh3-128 on a 64 MiB buffer in memory:           {(64 << 20) / 1e6 / raw:,.0f} MB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
