"""Model FLOPs per token and the device's peak FLOP/s, for MFU (model FLOPs utilisation).

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B, extended to frozen parameters):

    forward        2*N            + 4*L*H*Q*T
    backward       2*N            + 8*L*H*Q*T     gradients of the activations, through the whole network
                 + 2*N_trainable                  gradients of the weights that are trained

    N            parameters that take part in a matmul on every token: every parameter except embedding lookup
                 tables (token, position, token-type embeddings); a language-model head counts, tied to the token
                 embedding or not. LoRA adapters count (they are matmuls on every token).
    N_trainable  those of the N with requires_grad.
    L, H, Q, T   layers, attention heads, head size, and data.seq_len (the attention term counts the full T x T
                 score matrix, as PaLM does, causal mask or not).

With every parameter trained this is exactly PaLM's 6*N + 12*L*H*Q*T. Activation recomputation (activation
checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's. With freeze_bottom_layers or
freeze_all_but_head autograd skips the activation gradients below the lowest trained layer; they are still
counted, so MFU is an upper estimate there.

Peak FLOP/s per rank: REPARAM_PEAK_FLOPS when set; on a GPU in `GPU_PEAK_FLOPS` (dense bf16/fp16 tensor-core
numbers from the vendors' data sheets) the table value; otherwise a short matmul probe on the rank's own threads
(`measure_peak`). The peak is that of the precision the run's matmuls run in (`train.precision.Choice.peak_precision`):
a bf16 peak for a bf16 run, an fp32 peak for an fp32 run, so that MFU stays a fraction of what the hardware can do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from train.model import full_numel
from train.precision import dtype_of, matmul_rate

# (pattern on torch.cuda.get_device_name(), dense bf16/fp16 FLOP/s). The first match wins, so more specific first.
GPU_PEAK_FLOPS = [
    (r"H100.*PCIe", 756e12),
    (r"H100|H200|GH200", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"V100", 125e12),  # fp16 (V100 has no bf16)
    (r"\bT4\b", 65e12),  # fp16
]

PROBE_SECONDS = 0.5
CPU_PROBE_SIZES = (512, 1024)
PROBE_ROUNDS = 3


@dataclass(frozen=True)
class ModelFlops:
    flops_per_token: int
    n_matmul: int  # N
    n_trainable: int  # N_trainable
    layers: int  # L
    attention_width: int  # H*Q
    seq_len: int  # T


def _attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(L, H*Q) from the HF config of the model (a PEFT wrapper forwards `config`); (0, 0) if it has none."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 0, 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers), int(heads * head_dim)


def model_flops(model: torch.nn.Module, seq_len: int) -> ModelFlops:
    """Training FLOPs per token of `model` at sequence length `seq_len` (formula in the module docstring)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None and getattr(head, "weight", None) is not None:
        lookups.discard(id(head.weight))  # a tied LM head multiplies every token by the embedding matrix
    n_matmul = n_trainable = 0
    for param in model.parameters():  # each shared parameter once
        if id(param) in lookups:
            continue
        n_matmul += full_numel(param)
        n_trainable += full_numel(param) if param.requires_grad else 0
    layers, width = _attention_shape(model)
    per_token = 4 * n_matmul + 2 * n_trainable + 12 * layers * width * seq_len
    return ModelFlops(per_token, n_matmul, n_trainable, layers, width, seq_len)


def measure_peak(device: torch.device, dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> float:
    """FLOP/s of back-to-back square matmuls for about `seconds` on `device` (after one warm-up each): on CPU the
    best of `PROBE_ROUNDS` rounds over `CPU_PROBE_SIZES`, since the fastest shape differs between CPUs and dtypes and
    one short timing can land on a slow moment. A peak below what the run reaches would put MFU over 100%: one 1024²
    fp32 timing gave 60 GFLOP/s where the same core runs 80-100, and an fp32 run showed MFU 105%."""
    if device.type == "cuda":
        return matmul_rate(device, dtype, 4096, seconds)
    timings = [(n, seconds / (len(CPU_PROBE_SIZES) * PROBE_ROUNDS)) for _ in range(PROBE_ROUNDS)
               for n in CPU_PROBE_SIZES]
    return max(matmul_rate(device, dtype, n, share) for n, share in timings)


def table_peak(device_name: str) -> float | None:
    for pattern, flops in GPU_PEAK_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one rank in `precision` (bf16, fp16, fp32), where the number comes from)."""
    if os.environ.get("REPARAM_PEAK_FLOPS"):
        return float(os.environ["REPARAM_PEAK_FLOPS"]), "REPARAM_PEAK_FLOPS"
    dtype = dtype_of(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = table_peak(name) if dtype != torch.float32 else None
        if flops is not None:
            return flops, f"table: {name}"
        return measure_peak(device, dtype), f"measured: {name} {str(dtype).removeprefix('torch.')} matmul"
    return (measure_peak(device, dtype),
            f"measured: cpu {str(dtype).removeprefix('torch.')} matmul, {torch.get_num_threads()} threads")
