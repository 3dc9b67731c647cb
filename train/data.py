"""Training data over token shards: the items of a split, the batches built from them, and the global batch order.

An item is what the sampler draws and a rank's micro-batch holds `micro_batch_size` of:
- causal_lm (`TokenWindows`): `seq_len` consecutive tokens of one shard (documents are already EOS-separated in the
  stream, so packing is free); a window never crosses a shard boundary and a shard's tail shorter than `seq_len` is
  unused.
- sft and classification (`Documents`): one document (one example), cut to `seq_len` tokens.
Shards are memmapped: reading a batch copies only the tokens it needs. Every batch is a dict of tensors the model
is called with; `labels` holds the loss targets (-100 = no loss), in the model's input layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.blend import BlendSampler, load_blend
from data_prep.shards import ShardSet
from train.errors import ConfigError, ResumeError


IGNORE = -100  # label of a position without loss (PyTorch's cross-entropy ignore_index)


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

    @staticmethod
    def num_cut() -> int:
        """Windows cut nothing: documents flow across them."""
        return 0

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """A [len(indices), seq_len] int64 tensor of the given windows."""
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, (index, shard) in enumerate(zip(indices, shard_of)):
            offset = int(index - self.starts[shard]) * self.seq_len
            out[row] = self.shards.tokens(int(shard))[offset:offset + self.seq_len]
        return torch.from_numpy(out)

    def model_batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """(model inputs + labels, number of tokens in it)."""
        return self.batch_of(self.batch(indices))

    @staticmethod
    def batch_of(input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        """Windows as a causal-LM batch: every token is a target."""
        return {"input_ids": input_ids, "labels": input_ids.clone()}, input_ids.numel()


class Documents:
    """The split's documents (sft or classification examples), addressed by a global document index.

    sft rows: labels are the tokens whose loss mask is 1, -100 elsewhere. With `packing`, the micro-batch's
    examples fill rows of `seq_len` in order (a new row when the next one does not fit); a block-diagonal causal mask
    and positions that restart at each example keep examples from seeing each other, so the loss equals the unpacked
    loss on the same examples. Without packing each example is one row. classification rows: the document's tokens
    (attention_mask marks them), their token type ids where the shards carry them (text pairs of a BERT-style
    tokenizer, `manifest.classification.token_type_ids`), and one label per row; the target of such an example is
    (label, token type ids). Rows are right-padded with `pad_id` (type 0) to the longest row. Examples longer than
    `seq_len` keep their first `seq_len - 1` tokens and their final token (EOS, or the framing's last: [SEP]).
    """

    def __init__(self, shards: ShardSet, seq_len: int, kind: str, pad_id: int, packing: bool = False):
        self.shards, self.seq_len, self.kind, self.pad_id, self.packing = shards, seq_len, kind, pad_id, packing
        self.with_types = bool(shards.manifest.get("classification", {}).get("token_type_ids"))
        per_shard = np.asarray([len(shards.doc_offsets(i)) - 1 for i in range(len(shards))], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def num_cut(self) -> int:
        """Examples longer than seq_len, which `example` cuts: read from the document index, nothing loaded."""
        return sum(int(np.count_nonzero(np.diff(self.shards.doc_offsets(i)) > self.seq_len))
                   for i in range(len(self.shards)))

    def lengths(self) -> np.ndarray:
        """Tokens of every example as `example` returns it (cut to seq_len), from the document index."""
        return np.concatenate([np.minimum(np.diff(self.shards.doc_offsets(i)), self.seq_len)
                               for i in range(len(self.shards))]).astype(np.int64)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray | int]:
        """(token ids, loss mask) for sft, (token ids, label id) for classification; cut to seq_len."""
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        doc = int(index - self.starts[shard])
        offsets = self.shards.doc_offsets(shard)
        begin, end = int(offsets[doc]), int(offsets[doc + 1])
        ids = np.asarray(self.shards.tokens(shard)[begin:end], dtype=np.int64)
        types = None
        if self.kind == "sft":
            target = np.asarray(self.shards.loss_mask(shard)[begin:end], dtype=bool)
        else:
            target = int(self.shards.labels(shard)[doc])
            if self.with_types:
                types = np.asarray(self.shards.token_type_ids(shard)[begin:end], dtype=np.int64)
        if len(ids) > self.seq_len:
            keep = np.r_[0:self.seq_len - 1, len(ids) - 1]
            ids = ids[keep]
            target = target[keep] if self.kind == "sft" else target
            types = types[keep] if types is not None else None
        return ids, (target if types is None else (target, types))

    def model_batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """(model inputs + labels, number of tokens in it, padding excluded)."""
        return self.batch_of([self.example(int(i)) for i in indices])

    def batch_of(self, examples: list[tuple]) -> tuple[dict[str, torch.Tensor], int]:
        num_tokens = sum(len(ids) for ids, _ in examples)
        if self.kind == "classification":
            if self.with_types:
                width = max(len(ids) for ids, _ in examples)
                types = torch.zeros((len(examples), width), dtype=torch.long)
                for row, (_, (_, row_types)) in enumerate(examples):
                    types[row, :len(row_types)] = torch.from_numpy(row_types)
                labels = torch.tensor([label for _, (label, _) in examples])
                return self._rows([[e] for e in examples], {"labels": labels, "token_type_ids": types}), num_tokens
            labels = torch.tensor([label for _, label in examples])
            return self._rows([[e] for e in examples], {"labels": labels}), num_tokens
        rows = [[e] for e in examples]
        if self.packing:
            rows = []
            for example in examples:
                if rows and sum(len(ids) for ids, _ in rows[-1]) + len(example[0]) <= self.seq_len:
                    rows[-1].append(example)
                else:
                    rows.append([example])
        return self._rows(rows, {}), num_tokens

    def _rows(self, rows: list[list[tuple]], extra: dict) -> dict[str, torch.Tensor]:
        width = max(sum(len(ids) for ids, _ in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        segment = torch.zeros((len(rows), width), dtype=torch.long)  # 0 = padding, k = the row's k-th example
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for k, (ids, target) in enumerate(row, start=1):
                n = len(ids)
                input_ids[r, at:at + n] = torch.from_numpy(ids)
                if self.kind == "sft":
                    labels[r, at:at + n] = torch.where(torch.from_numpy(target), input_ids[r, at:at + n], IGNORE)
                    # The first token of an example is predicted from nothing of its own; without this, a packed
                    # row would train it on the previous example's last token.
                    labels[r, at] = IGNORE
                segment[r, at:at + n] = k
                position_ids[r, at:at + n] = torch.arange(n)
                at += n
        batch = {"input_ids": input_ids, "attention_mask": (segment > 0).long(), **extra}
        if self.kind == "sft":
            batch["labels"] = labels
        if self.packing and self.kind == "sft":
            # [rows, 1, width, width], True = may attend: causal, within one example. A padding position attends to
            # itself only, so no softmax row is empty (an all-False row gives NaN in SDPA).
            causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
            same = segment[:, :, None] == segment[:, None, :]
            own = torch.eye(width, dtype=torch.bool)
            batch["attention_mask"] = ((causal & same & (segment[:, :, None] > 0)) | own)[:, None]
            batch["position_ids"] = position_ids
        return batch


class BlendedItems:
    """Items of several shard directories drawn in proportion to their weights (a `data_prep.blend` spec).

    Item `i` is the sample `data_prep.blend.BlendSampler` assigns to global index `i` from (seed, i) alone, so the
    GlobalBatchSampler's order, resume and any world size work unchanged. One epoch is as many samples as the parts
    hold items together; a part with a larger share than its size is repeated within it, a smaller one subsampled.
    """

    def __init__(self, parts: list, sampler: BlendSampler):
        self.parts, self.sampler = parts, sampler

    def __len__(self) -> int:
        return int(self.sampler.items.sum())

    def num_cut(self) -> int:
        """Items longer than seq_len over the parts (each counted once, however often the blend samples it)."""
        return sum(part.num_cut() for part in self.parts)

    def _locate(self, indices: np.ndarray) -> list[tuple[int, int]]:
        """(part, item index within the part) of each sample."""
        part, shard, local = self.sampler.sample(indices)
        return [(int(p), int(self.sampler.starts[p][s] + i)) for p, s, i in zip(part, shard, local)]

    def lengths(self) -> np.ndarray:
        """Tokens of every sample (Documents parts only: windows all hold seq_len)."""
        part, shard, local = self.sampler.sample(np.arange(len(self)))
        lengths = np.empty(len(self), dtype=np.int64)
        for p, items in enumerate(self.parts):
            here = part == p
            lengths[here] = items.lengths()[self.sampler.starts[p][shard[here]] + local[here]]
        return lengths

    def model_batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        located = self._locate(indices)
        if isinstance(self.parts[0], TokenWindows):
            return TokenWindows.batch_of(torch.cat([self.parts[p].batch(np.array([i])) for p, i in located]))
        return self.parts[0].batch_of([self.parts[p].example(i) for p, i in located])

    def realised(self) -> np.ndarray:
        """Each part's share of one epoch's samples."""
        return self.sampler.realised(len(self))


def open_split(cfg, split: str) -> tuple[dict, ShardSet | tuple[list[ShardSet], np.ndarray]]:
    """(manifest, the split's shards) of a run config (`train.config.Config`): one shard directory, or
    (parts, weights) when data.path is a blend spec file (`data_prep.blend`: every part made with the same
    tokenizer and record kind)."""
    if Path(cfg.data.path).is_file():
        sets, weights = load_blend(cfg.data.path, split)
        return sets[0].manifest, (sets, weights)
    shards = ShardSet(cfg.data.path, split)
    return shards.manifest, shards


def split_items(cfg, shards, manifest: dict):
    """The items the task trains or evaluates on, over what `open_split` returned."""
    from train.model import pad_id

    def items_of(one: ShardSet):
        if cfg.task.kind == "causal_lm":
            return TokenWindows(one, cfg.data.seq_len)
        return Documents(one, cfg.data.seq_len, cfg.task.kind, pad_id(manifest), packing=cfg.task.sft_packing)

    if isinstance(shards, ShardSet):
        return items_of(shards)
    sets, weights = shards
    sampler = BlendSampler(sets, weights, cfg.data.seq_len if cfg.task.kind == "causal_lm" else None, cfg.run.seed)
    return BlendedItems([items_of(one) for one in sets], sampler)


def run_steps(cfg, num_items: int, global_batch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run): train.epochs passes over the `num_items` training
    items at `global_batch` items per step, else train.max_steps. Derived here only (open_run_data, launcher.plan)."""
    per_epoch = num_items // global_batch
    return per_epoch, (cfg.train.epochs * per_epoch if cfg.train.epochs else cfg.train.max_steps)


@dataclass
class RunData:
    """Everything a run trains and evaluates on, opened once at start."""
    manifest: dict  # of the training split's shards (of the blend's first part)
    train: object  # TokenWindows, Documents or BlendedItems
    val: object | None
    test: object | None
    items_cut: dict  # {split: items longer than data.seq_len, cut to fit (counted, never silent)}
    blend: list | None  # [{path, weight, realised share per epoch}] when training on a blend
    sampler: "GlobalBatchSampler"
    steps_per_epoch: int
    max_steps: int  # derived once, here: schedule, loop and logs read it

    @property
    def num_labels(self) -> int:
        classification = self.manifest.get("classification")
        return classification["num_labels"] if classification else 0


def open_run_data(cfg, rank: int, world_size: int) -> RunData:
    """The splits of a run config (`train.config.Config`), checked against its task, and the training order."""
    from train.config import RECORD_KIND_OF_TASK

    manifest, train_sets = open_split(cfg, cfg.data.train_split)
    kind, record_kind = cfg.task.kind, manifest.get("record_kind", "text")
    if record_kind != RECORD_KIND_OF_TASK[kind]:
        raise ConfigError(f"task.kind: {kind} trains on '{RECORD_KIND_OF_TASK[kind]}' shards but {cfg.data.path} "
                          f"holds '{record_kind}' records; set task.kind or tokenize with --record-kind "
                          f"{RECORD_KIND_OF_TASK[kind]}")
    train = split_items(cfg, train_sets, manifest)
    val, test = (split_items(cfg, open_split(cfg, split)[1], manifest) if split else None
                 for split in (cfg.data.val_split, cfg.data.test_split))
    # Examples longer than data.seq_len are cut (first seq_len - 1 tokens + the last): counted, never silent.
    items_cut = {split: items.num_cut() for split, items in (("train", train), ("val", val), ("test", test))
                 if items is not None}
    blend = None
    if isinstance(train, BlendedItems):
        sampler = train.sampler
        blend = [{"path": str(s.directory), "weight": float(w), "realised": float(r)}
                 for s, w, r in zip(sampler.sets, sampler.weights, train.realised())]
    grouping = cfg.data.length_grouping
    sampler = GlobalBatchSampler(len(train), cfg.train.micro_batch_size, cfg.train.grad_accum_steps, world_size,
                                 rank, cfg.run.seed, lengths=train.lengths() if grouping else None,
                                 group_size=grouping)
    steps_per_epoch, max_steps = run_steps(cfg, len(train), sampler.global_batch)
    return RunData(manifest, train, val, test, items_cut, blend, sampler, steps_per_epoch, max_steps)


class GlobalBatchSampler:
    """Which windows every rank reads at every micro-step.

    The order is global, not per rank: epoch `e` visits all windows in a permutation drawn from `(seed, e)`, and
    each optimizer step consumes the next `global_batch` positions of it (a tail shorter than a global batch is
    skipped). Inside a step, rank `r`'s micro-batch `m` takes positions `[(m * world + r) * micro, ... + micro)`.
    The whole state is `(epoch, position)`, so restoring it is O(1) and replays nothing, at any world size.
    Global batches marked with `skip` (batches that made the loss non-finite) are passed over.

    With `group_size` (data.length_grouping) and the items' `lengths`, each run of `group_size` consecutive
    positions of the permutation is sorted by length, longest first: neighbouring positions, hence the rows of one
    micro-batch, have similar lengths and pad little, while which items share a group stays random. The order is
    still a function of the seed, the epoch and the data only (a group size in items, not in batches, keeps it
    independent of the world size), so resume stays exact.
    """

    VERSION = 1

    def __init__(self, num_windows: int, micro_batch: int, accum_steps: int, world_size: int, rank: int,
                 seed: int, lengths: np.ndarray | None = None, group_size: int = 0):
        self.num_windows = num_windows
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.lengths, self.group_size = lengths, group_size
        self.global_batch = micro_batch * accum_steps * world_size
        if num_windows < self.global_batch:
            raise ConfigError(f"data.path: the training split has {num_windows} items (windows of data.seq_len tokens, "
                              f"or examples) but one optimizer step needs {self.global_batch} (micro_batch_size x "
                              "grad_accum_steps x world size); use more data, a shorter data.seq_len or a smaller "
                              "batch")
        self.epoch = 0
        self.position = 0
        self.step_start = (0, 0)  # (epoch, position) of the global batch the last next_step() returned
        self.skipped: set[tuple[int, int]] = set()
        self._order_epoch = None
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            if self.group_size:
                # lexsort is stable and sorts by the last key first: by group, then longest first within it.
                order = order[np.lexsort((-self.lengths[order], np.arange(len(order)) // self.group_size))]
            self._order = order
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

    def at_epoch_end(self) -> bool:
        """Whether the step just taken was the last full global batch of its epoch."""
        return self.position + self.global_batch > self.num_windows

    def skip(self, batches) -> None:
        """Never train on these global batches, given as (epoch, position) of their start."""
        self.skipped.update(tuple(b) for b in batches)

    def state_dict(self) -> dict:
        return {"version": self.VERSION, "epoch": self.epoch, "position": self.position,
                "num_windows": self.num_windows, "global_batch": self.global_batch, "world_size": self.world_size,
                "seed": self.seed, "length_grouping": self.group_size, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.VERSION:
            raise ResumeError(f"data sampler state has version {state.get('version')}, expected {self.VERSION}")
        # A state saved before length grouping existed has no length_grouping: it ran without (0).
        for key, saved, ours in (("num_windows", state["num_windows"], self.num_windows),
                                 ("seed", state["seed"], self.seed),
                                 ("length_grouping", state.get("length_grouping", 0), self.group_size)):
            if saved != ours:
                raise ResumeError(f"cannot resume: the checkpoint's data sampler has {key}={saved} but this run has "
                                  f"{ours}; the training data, the seed or data.length_grouping changed")
        # The position counts windows of the epoch's order, not steps: with another global batch (a new world
        # size) the run still consumes exactly the continuation of the same window sequence.
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.skipped = {tuple(b) for b in state["skipped"]}


def eval_batches(num_items: int, micro_batch: int, world_size: int, rank: int, max_batches: int):
    """This rank's micro-batches for one evaluation pass, as the item indices it must score (possibly none).

    `max_batches` > 0: the first `max_batches` full rounds of the split, in order. 0: the whole split; the last round
    is partial. Every rank runs the same number of forward passes, which ZeRO-3 needs (its forward gathers
    parameters collectively); a rank without items left scores a placeholder and counts nothing.
    """
    per_round = micro_batch * world_size
    rounds = min(max_batches, num_items // per_round) if max_batches else -(-num_items // per_round)
    for m in range(rounds):
        start = (m * world_size + rank) * micro_batch
        yield np.arange(start, min(start + micro_batch, num_items))
