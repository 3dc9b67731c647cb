"""Per-rank memory of a run, predicted before it starts: model states per ZeRO stage (with and without CPU offload)
from the parameter counts, and activations from a trace of one micro-batch of the run's own model and loss.

Model states, in bytes per parameter, for mixed precision (bf16/fp16: 16-bit weights w = 2 and fp32 masters) with
N data-parallel ranks, P parameters and T of them trained (what DeepSpeed 0.19 allocates, as in the ZeRO paper's
2 + 2 + 12 plus the buffers DeepSpeed adds):

    stage   16-bit weights     16-bit grads          fp32 grads   masters + Adam m, v   step temporaries
    0       2P                 2T                    4T           12T                   4T
    1       2P                 2T + bucket + 2T/N    4T/N         12T/N                 4T/N
    2       2P                 2T/N + 2 buckets      4T/N         12T/N                 4T/N
    3       2P/N + gathered    2T/N + 2 buckets      4T/N         12T/N                 4T/N

Stage 0 in bf16 is DeepSpeed's FP16_UnfusedOptimizer: fp32 master weights and fp32 copies of the gradients for the
whole model on every rank. "Step temporaries" is torch AdamW's foreach `sqrt(v)` buffer. A bucket holds
`reduce_bucket_size` 16-bit gradient elements (two with overlap_comm), at most T: stage 1 all-reduces the gradients
through a flattened copy of each bucket and keeps its own part, stage 2 reduces them into the buckets. ZeRO-3 keeps
parameters below `stage3_param_persistence_threshold` elements whole on every rank and gathers the largest layer
plus `stage3_prefetch_bucket_size` elements during forward and backward. fp32 training has no separate masters:
weights 4P and gradients 4T; stage 0 then runs torch AdamW on the module itself (8T moments + 4T temporaries), stages
1-3 keep the same fp32 partitions as above.

CPU offload (`offload_optimizer`) moves fp32 gradients, masters, Adam state and temporaries to host memory;
`offload_param` (ZeRO-3) also moves the 16-bit weights, leaving the gathered layers on the device.

Activations: the run's model is built under PyTorch's FakeTensorMode (shapes and dtypes, no storage, no compute)
in the training dtype, and `torch.distributed._tools.mem_tracker.MemTracker` follows one micro-batch through the
forward pass, the task's loss (`train.tasks.loss`) and the backward pass, with activation checkpointing on and off.
Its peak of activations and temporaries is what autograd and the kernels keep alive, whatever the architecture;
attention is traced with the kernel the run will use (`_attention_kernels`). It scales linearly with the
micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from train.config import Config
from train.precision import dtype_of
from train.model import apply_finetune, build_model, full_numel

STAGES = (0, 1, 2, 3)
# DeepSpeed's defaults where a preset leaves them out (deepspeed/runtime/zero/config.py).
DEFAULT_BUCKET = 500_000_000
DEFAULT_PREFETCH = 50_000_000
DEFAULT_PERSISTENCE = 100_000


@dataclass(frozen=True)
class ModelCounts:
    total: int  # parameters (each shared tensor once)
    trainable: int
    largest_layer: int  # parameters of the module with the most direct parameters (what ZeRO-3 gathers at once)
    small: int  # parameters in tensors of at most stage3_param_persistence_threshold elements


@dataclass(frozen=True)
class Activations:
    checkpointed: int  # bytes per micro-batch, activation checkpointing on
    full: int  # off
    micro_batch: int


@dataclass(frozen=True)
class States:
    """Bytes of one rank's model states, on the device and on the host (CPU offload)."""
    weights: int
    grads: int
    optimizer: int  # fp32 masters, fp32 gradients, Adam moments and step temporaries
    host: int  # what offload moved to host memory

    @property
    def device(self) -> int:
        return self.weights + self.grads + self.optimizer


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # from_config builds in the default dtype: the module DeepSpeed would train
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fake_model(cfg: Config, manifest: dict, checkpointing: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    model_cfg = dataclasses.replace(cfg.model, activation_checkpointing=checkpointing)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # PEFT's adapters are real (below)
    # FakeTensorMode's dispatch cache is one dict shared by every mode in the process, and a crash inside its lookup
    # has been seen; a plan traces a few small graphs, so it does without the cache.
    mode.cache_enabled = False
    with _default_dtype(dtype_of(cfg.train.precision)):
        with mode:
            # A pretrained model is built from its config: sizes need no weights, and safetensors' memory-mapped
            # loading under fake tensors can crash the interpreter.
            model = build_model(cfg, manifest, base_only=True, load_weights=False)
        # PEFT moves its adapters with Module.to, which cannot swap fake parameters: they are made real, and small.
        model = apply_finetune(model, cfg)
    return model.train(), mode


def count(cfg: Config, manifest: dict, persistence_threshold: int = DEFAULT_PERSISTENCE) -> ModelCounts:
    model, _ = _fake_model(cfg, manifest, checkpointing=False)
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(full_numel(p) for p in params)
    trainable = sum(full_numel(p) for p in params if p.requires_grad)
    largest = max(sum(full_numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    small = sum(full_numel(p) for p in params if full_numel(p) <= persistence_threshold)
    return ModelCounts(total, trainable, largest, small)


def _batch(cfg: Config) -> tuple[dict, torch.Tensor]:
    """A micro-batch of the configured shape: token ids (and a full attention mask for classification)."""
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.zeros(b, s, dtype=torch.long)
    if cfg.task.kind == "classification":
        mask = torch.ones(b, s, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}, torch.zeros(b, dtype=torch.long)
    return {"input_ids": ids}, ids


@contextlib.contextmanager
def _attention_kernels(gpu: bool):
    """Trace attention with the kernel the run will use; under fake tensors PyTorch would always pick the math
    kernel, which keeps the seq x seq scores. A GPU runs flash attention (O(seq) memory; its dropout mask is
    regenerated in the backward pass, not stored, so it is traced without dropout); a CPU runs its flash kernel
    only without attention dropout (what torch._fused_sdp_choice decides on real CPU tensors), the math kernel
    otherwise."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = F.scaled_dot_product_attention

    def scaled_dot_product_attention(*args, dropout_p=0.0, **kwargs):
        if gpu or dropout_p == 0.0:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return original(*args, dropout_p=0.0, **kwargs)
        return original(*args, dropout_p=dropout_p, **kwargs)

    F.scaled_dot_product_attention = scaled_dot_product_attention  # transformers looks it up at each call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def trace_activations(cfg: Config, manifest: dict, gpu: bool = False) -> Activations:
    """Peak activation + temporary bytes of one micro-batch, with activation checkpointing on and off, as the run
    would keep them on a GPU (`gpu`) or on this CPU."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from train import tasks

    peaks = []
    for checkpointing in (True, False):
        model, mode = _fake_model(cfg, manifest, checkpointing)
        with mode, _attention_kernels(gpu):
            inputs, labels = _batch(cfg)
            tracker = MemTracker()
            tracker.track_external(model)
            # MemTracker hooks every parameter to count gradients, which fails on frozen ones (LoRA, freeze);
            # gradients are model state here (`states`), so it is told not to.
            track_module = tracker._track_module_params_and_buffers
            tracker._track_module_params_and_buffers = lambda module, install_grad_hooks=True: track_module(
                module, install_grad_hooks=False)
            with tracker:
                logits = model(**inputs).logits
                tasks.loss(cfg.task.kind, logits, labels, cfg.task.label_smoothing).backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        peaks.append(peak[_MemRefType.ACT] + peak[_MemRefType.TEMP])
    return Activations(checkpointed=peaks[0], full=peaks[1], micro_batch=cfg.train.micro_batch_size)


def zero_settings(ds: dict) -> dict:
    zero = ds.get("zero_optimization", {})
    return {"bucket": int(zero.get("reduce_bucket_size", DEFAULT_BUCKET)),
            "overlap_comm": bool(zero.get("overlap_comm", False)),
            "prefetch": int(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH)),
            "persistence": int(zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE))}


def states(counts: ModelCounts, stage: int, world_size: int, precision: str, zero: dict,
           offload_optimizer: bool = False, offload_params: bool = False) -> States:
    """One rank's model-state bytes (table in the module docstring)."""
    P, T, N = counts.total, counts.trainable, world_size
    w = 2 if precision in ("bf16", "fp16") else 4
    if stage == 0 and w == 4:
        optimizer = (8 + 4) * T  # torch AdamW on the module itself: moments + temporaries
    else:
        optimizer = (4 + 4 + 8 + 4) * T // (N if stage >= 1 else 1)  # fp32 grads, masters, moments, temporaries
    if stage == 0:
        grads = w * T
    elif stage == 1:
        grads = w * (T + min(zero["bucket"], T) + T // N)  # all-reduced in flattened buckets, own part kept
    else:
        buckets = (2 if zero["overlap_comm"] else 1) * min(zero["bucket"], T)
        grads = w * (T // N + buckets)
    if stage == 3:
        gathered = min(counts.total, counts.largest_layer + zero["prefetch"])
        resident = counts.small + (counts.total - counts.small) // N
        weights = w * ((counts.small if offload_params else resident) + gathered)
    else:
        weights = w * P
    host = 0
    if offload_optimizer:
        host, optimizer = optimizer, 0
    if offload_params and stage == 3:
        host += w * (counts.total - counts.small) // N
    return States(weights=weights, grads=grads, optimizer=optimizer, host=host)


def checkpoint_bytes(counts: ModelCounts, precision: str) -> int:
    """A DeepSpeed checkpoint on disk, all ranks together: the 16-bit (or fp32) weights once, plus fp32 masters
    (mixed precision) and both Adam moments of the trained parameters."""
    if precision in ("bf16", "fp16"):
        return 2 * counts.total + 12 * counts.trainable
    return 4 * counts.total + 8 * counts.trainable
