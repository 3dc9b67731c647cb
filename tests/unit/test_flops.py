"""train.flops: model FLOPs per trained token (the PaLM count, hand-checked on the tiny GPT-2, frozen parameters
getting no weight-gradient FLOPs) and the peak FLOP/s that MFU divides by (a GPU table, a CPU measurement, the
REPARAM_PEAK_FLOPS override)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from train import flops


def tiny_gpt2(tie: bool = True) -> GPT2LMHeadModel:
    # TINY_MODEL of tests/conftest.py on the 512-token tiny_data tokenizer
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie))


# Hand count for GPT-2, d = 64, L = 2, V = 512, T = 64. Per block: c_attn 64x192 + 192, attn c_proj 64x64 + 64,
# c_fc 64x256 + 256, mlp c_proj 256x64 + 64, two LayerNorms 2 x (64 + 64): 12*d*d + 13*d = 49,984 parameters.
# N = 2 blocks + ln_f (2*64) + the tied LM head (512x64); the token (512x64) and position (64x64) lookups excluded.
N_TINY = 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64 + 512 * 64  # 132,864
ATTENTION = 12 * 2 * 64 * 64  # 12 * L * (H*Q) * T = 98,304


def test_flops_per_token_of_the_tiny_gpt2_is_the_palm_hand_count():
    count = flops.model_flops(tiny_gpt2(), seq_len=64)
    assert (count.n_matmul, count.n_trainable, count.layers, count.attention_width) == (132_864, 132_864, 2, 64)
    assert count.flops_per_token == 6 * N_TINY + ATTENTION == 895_488


def test_frozen_parameters_get_no_weight_gradient_flops():
    model = tiny_gpt2(tie=False)  # an own 512x64 lm_head (no bias), trained alone
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    count = flops.model_flops(model, seq_len=64)
    assert (count.n_matmul, count.n_trainable) == (N_TINY, 512 * 64)
    # forward 2N + backward through the activations 2N + weight gradients of the head only 2 * 512 * 64
    assert count.flops_per_token == 4 * N_TINY + 2 * 512 * 64 + ATTENTION == 695_296


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12),
                                        ("Tesla V100-SXM2-16GB", 125e12), ("NVIDIA A10G", None),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_table(name, peak):
    assert flops.table_peak(name) == peak


def test_peak_is_measured_on_cpu_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv("REPARAM_PEAK_FLOPS", raising=False)
    peak, source = flops.peak_flops(torch.device("cpu"), "fp32")
    assert peak > 1e8 and source == f"measured: cpu float32 matmul, {torch.get_num_threads()} threads"
    monkeypatch.setenv("REPARAM_PEAK_FLOPS", "2.5e12")
    assert flops.peak_flops(torch.device("cpu"), "bf16") == (2.5e12, "REPARAM_PEAK_FLOPS")
