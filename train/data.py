"""Training data over token shards: fixed-length windows and the global batch order.

Windows are `seq_len` consecutive tokens of one shard (documents are already EOS-separated in the stream, so
packing is free); a window never crosses a shard boundary and a shard's tail shorter than `seq_len` is unused.
Shards are memmapped: reading a batch copies only the windows it needs.
"""

from __future__ import annotations

import numpy as np
import torch

from data_prep.shards import ShardSet
from train.errors import ConfigError, ResumeError


class TokenWindows:
    """The split's token stream cut into `seq_len` windows, addressed by a global window index."""

    def __init__(self, shards: ShardSet, seq_len: int):
        self.shards = shards
        self.seq_len = seq_len
        per_shard = np.asarray(shards.shard_num_tokens, dtype=np.int64) // seq_len
        # starts[s] = index of shard s's first window; starts[-1] = total windows.
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """A [len(indices), seq_len] int64 tensor of the given windows."""
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, (index, shard) in enumerate(zip(indices, shard_of)):
            offset = int(index - self.starts[shard]) * self.seq_len
            out[row] = self.shards.tokens(int(shard))[offset:offset + self.seq_len]
        return torch.from_numpy(out)


class GlobalBatchSampler:
    """Which windows every rank reads at every micro-step.

    The order is global, not per rank: epoch `e` visits all windows in a permutation drawn from `(seed, e)`, and
    each optimizer step consumes the next `global_batch` positions of it (a tail shorter than a global batch is
    skipped). Inside a step, rank `r`'s micro-batch `m` takes positions `[(m * world + r) * micro, ... + micro)`.
    The whole state is `(epoch, position)`, so restoring it is O(1) and replays nothing, at any world size.
    Global batches marked with `skip` (batches that made the loss non-finite) are passed over.
    """

    VERSION = 1

    def __init__(self, num_windows: int, micro_batch: int, accum_steps: int, world_size: int, rank: int,
                 seed: int):
        self.num_windows = num_windows
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch * accum_steps * world_size
        if num_windows < self.global_batch:
            raise ConfigError(f"data.path: the training split has {num_windows} windows but one optimizer step needs "
                             f"{self.global_batch} (micro_batch_size x grad_accum_steps x world size); "
                             "use more data, a shorter data.seq_len or a smaller batch")
        self.epoch = 0
        self.position = 0
        self.step_start = (0, 0)  # (epoch, position) of the global batch the last next_step() returned
        self.skipped: set[tuple[int, int]] = set()
        self._order_epoch = None
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_step(self) -> list[np.ndarray]:
        """This rank's window indices for each micro-batch of the next optimizer step."""
        while True:
            if self.position + self.global_batch > self.num_windows:
                self.epoch += 1
                self.position = 0
            if (self.epoch, self.position) not in self.skipped:
                break
            self.position += self.global_batch
        self.step_start = (self.epoch, self.position)
        step = self._epoch_order()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        micro = self.micro_batch
        return [step[(m * self.world_size + self.rank) * micro:][:micro] for m in range(self.accum_steps)]

    def skip(self, batches) -> None:
        """Never train on these global batches, given as (epoch, position) of their start."""
        self.skipped.update(tuple(b) for b in batches)

    def state_dict(self) -> dict:
        return {"version": self.VERSION, "epoch": self.epoch, "position": self.position,
                "num_windows": self.num_windows, "global_batch": self.global_batch, "world_size": self.world_size,
                "seed": self.seed, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.VERSION:
            raise ResumeError(f"data sampler state has version {state.get('version')}, expected {self.VERSION}")
        for key in ("num_windows", "seed"):
            if state[key] != getattr(self, key):
                raise ResumeError(f"cannot resume: the checkpoint's data sampler has {key}={state[key]} but this run "
                                  f"has {getattr(self, key)}; the training data or the seed changed")
        # The position counts windows of the epoch's order, not steps: with another global batch (a new world
        # size) the run still consumes exactly the continuation of the same window sequence.
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.skipped = {tuple(b) for b in state["skipped"]}


def eval_batches(num_windows: int, micro_batch: int, world_size: int, rank: int, max_batches: int):
    """This rank's micro-batches for one validation pass: the first windows of the split, in order.

    Every rank gets the same number of batches, which ZeRO-3 needs (its forward gathers parameters collectively).
    """
    per_rank = min(max_batches, num_windows // (micro_batch * world_size))
    for m in range(per_rank):
        start = (m * world_size + rank) * micro_batch
        yield np.arange(start, start + micro_batch)
