"""What may change between a checkpoint and the run that continues it, and resuming at another world size.

A resumed run must train the same model on the same data: a change to a field that `train.config` declares
breaking (architecture, task, fine-tuning method, sequence length, training split, seed, precision, ZeRO preset) or
to the tokenizer is an error listing every differing key. Anything else (total steps, log/eval/save intervals,
learning rate, batch size) is allowed and reported.

A checkpoint written by a different number of ranks holds optimizer partitions of the wrong shape; it is
converted once, by rank 0, to DeepSpeed's universal format (`step_<N>.universal/`), which any world size loads.
The conversion gets its own `checkpoint.json` (sizes and checksums) and is verified like a checkpoint before each
use; a damaged one is converted again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from train.checkpoint import remove, verify, write_manifest
from train.config import MOVED_KEYS, breaking_keys, field_defaults
from train.errors import ResumeError

TOKENIZER_KEY = "tokenizer_fingerprint"  # beside the config in a checkpoint's identity; changing it is breaking


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_compatible(saved: dict, current: dict, checkpoint: Path) -> list[str]:
    """Raise ResumeError if a breaking key differs; return 'key: old -> new' for the allowed changes."""
    # A checkpoint written before some keys moved (config.MOVED_KEYS) names them as they were.
    old, new = {MOVED_KEYS.get(k, k): v for k, v in flatten(saved).items()}, flatten(current)
    # A key added after the checkpoint was written: its run had the key's default.
    old.update({k: v for k, v in field_defaults().items() if k in new and k not in old})
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    described = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    fixed = {*breaking_keys(), TOKENIZER_KEY}
    # model.hf_config is flattened into model.hf_config.n_layer, ...: a key below a breaking one breaks too.
    breaking = [d for k, d in zip(changed, described)
                if k in fixed or any(k.startswith(f"{b}.") for b in fixed)]
    if breaking:
        raise ResumeError(f"cannot resume from {checkpoint}: the run changed in ways that change the model or its "
                          f"data: {'; '.join(breaking)}. Restore them, or start a new run (another run.name)")
    return described


def convert_to_universal(directory: Path, tag: str, rank: int) -> str:
    """Collective: rank 0 converts checkpoint `tag` to the universal format (once); returns the tag to load."""
    universal = f"{tag}.universal"
    target = directory / universal
    error = [None]
    if rank == 0 and (target.exists() or target.is_symlink()):
        problem = verify(target)
        if problem:
            print(f"warning: converting {directory / tag} again: {target}: {problem}", file=sys.stderr, flush=True)
            remove(target)
    if rank == 0 and not target.exists():
        staging = directory / f"{universal}.partial"
        remove(staging)  # left by a conversion that was killed
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(directory / tag), "--output_folder", str(staging), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
        print(f"converting {directory / tag} to the universal checkpoint format: {' '.join(command)}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            write_manifest(staging, {"universal_of": tag})
            staging.rename(target)
        else:
            error[0] = f"converting {directory / tag} to a universal checkpoint failed:\n{result.stderr[-3000:]}"
    dist.broadcast_object_list(error, src=0)  # every rank fails together instead of waiting on a dead peer
    if error[0]:
        raise ResumeError(error[0])
    return universal
