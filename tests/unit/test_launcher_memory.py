"""launcher.memory without running anything: parameter counts from the fake-tensor build, the ZeRO model-state table
against DeepSpeed's own estimator, and the activation trace (micro-batch, checkpointing, the attention kernel the run
uses)."""

from __future__ import annotations

import pytest

from launcher import memory
from train import config as config_lib

VOCAB = 50257
MANIFEST = {"tokenizer": {"vocab_size": VOCAB, "eos_id": 0, "bos_id": 0, "pad_id": None}}


def gpt2(layers: int, width: int, heads: int, seq_len: int, **sections) -> config_lib.Config:
    raw = {"model": {"model_type": "gpt2", "hf_config": {"n_layer": layers, "n_embd": width, "n_head": heads,
                                                        "n_positions": seq_len}},
           "data": {"path": "unused", "seq_len": seq_len},
           "train": {"micro_batch_size": 2, "precision": "bf16"}}  # concrete, as `plan` resolves auto before sizing
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_lib.from_dict(raw)


def gpt2_parameters(layers: int, d: int, positions: int) -> int:
    # token + position embeddings (the LM head is tied), per block 2 layer norms + attention + MLP, final norm
    return VOCAB * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def test_counts_come_from_the_real_architecture_without_allocating_it():
    counts = memory.count(gpt2(24, 1024, 16, 1024), MANIFEST)  # GPT-2 medium: 1.4 GB in fp32 if it were real
    assert counts.total == counts.trainable == gpt2_parameters(24, 1024, 1024)
    assert counts.largest_layer == VOCAB * 1024  # the token embedding
    lora = memory.count(gpt2(24, 1024, 16, 1024, finetune={"method": "lora", "lora_r": 8}), MANIFEST)
    assert lora.total > counts.total and lora.trainable == 24 * 8 * (1024 + 3 * 1024)  # c_attn A and B per layer


def test_zero_stages_are_ordered_and_match_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = memory.count(gpt2(24, 1024, 16, 1024), MANIFEST)
    P, N = counts.total, 8
    zero = {"bucket": 50_000_000, "overlap_comm": True, "prefetch": 50_000_000, "persistence": 100_000}
    rows = {stage: memory.states(counts, stage, N, "bf16", zero) for stage in memory.STAGES}
    device = [rows[stage].device for stage in memory.STAGES]
    assert device == sorted(device, reverse=True) and len(set(device)) == 4
    assert rows[0] == memory.States(weights=2 * P, grads=2 * P, optimizer=20 * P, host=0)
    # DeepSpeed counts 2P 16-bit weights + 18P/N (16-bit grads, fp32 grads, masters, Adam); ours adds the two
    # gradient buckets and AdamW's temporaries and splits exactly the same way.
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, cpu_offload=False)
    assert rows[2].device - ds_gpu == pytest.approx(2 * 2 * 50_000_000 + 4 * P / N, abs=8)
    _, ds_offload_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, cpu_offload=True)
    offload = memory.states(counts, 2, N, "bf16", zero, offload_optimizer=True)
    assert offload.weights == ds_offload_gpu and offload.host == rows[2].optimizer and offload.optimizer == 0
    both = memory.states(counts, 3, N, "bf16", zero, offload_optimizer=True, offload_params=True)
    assert both.device < memory.states(counts, 3, N, "bf16", zero, offload_optimizer=True).device < rows[3].device
    assert memory.checkpoint_bytes(counts, "bf16") == 14 * P


def test_activation_trace_scales_with_the_micro_batch_and_checkpointing_saves():
    small = memory.trace_activations(gpt2(2, 64, 2, 128), MANIFEST)
    double = memory.trace_activations(gpt2(2, 64, 2, 128, train={"micro_batch_size": 4}), MANIFEST)
    assert 0 < small.checkpointed < small.full
    assert double.full == pytest.approx(2 * small.full, rel=0.02)
    assert double.checkpointed == pytest.approx(2 * small.checkpointed, rel=0.02)


def test_attention_is_traced_with_the_kernel_the_run_uses():
    # GPT-2's attention dropout makes the CPU run the math kernel (seq x seq scores kept); a GPU's flash kernel,
    # or the CPU's without attention dropout, keeps none.
    long = gpt2(2, 64, 2, 1024)
    cpu, gpu = memory.trace_activations(long, MANIFEST), memory.trace_activations(long, MANIFEST, gpu=True)
    scores = 2 * 2 * 1024 * 1024 * 2  # one layer's bf16 attention probabilities: batch x heads x seq x seq
    assert cpu.full - gpu.full > 2 * scores
    no_dropout = gpt2(2, 64, 2, 1024, model={"hf_config": {"n_layer": 2, "n_embd": 64, "n_head": 2,
                                                            "n_positions": 1024, "attn_pdrop": 0.0}})
    assert memory.trace_activations(no_dropout, MANIFEST) == gpu
