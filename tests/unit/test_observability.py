"""Observability without a training run: FLOPs per token, the peak FLOP/s sources, progress bar vs log lines,
the end-of-run table and `python -m train.report`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import ROOT
from train import flops
from train.metrics import Metrics, use_progress_bar


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


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, monkeypatch):
    assert use_progress_bar(FakeTTY()) and not use_progress_bar(io.StringIO())
    for stream, shown in ((FakeTTY(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        metrics = Metrics(tmp_path / ("tty" if shown else "plain"), enabled=True)
        assert metrics.start_progress(total=10, initial=0) is shown
        metrics.progress(3, {"loss": "1.2345", "tokens/s": "1,024"})
        metrics.print("checkpoint x")
        metrics.close()
        out = stream.getvalue()
        assert "checkpoint x\n" in out
        assert ("3/10" in out and "loss 1.2345 | tokens/s 1,024" in out) is shown
    assert not Metrics(tmp_path / "rank1", enabled=False).start_progress(10, 0)  # other ranks never show one


def test_a_zero_width_terminal_gets_plain_lines(monkeypatch):
    class TTYWithFd(FakeTTY):
        def fileno(self):
            return 1

    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert not use_progress_bar(TTYWithFd())
    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((120, 40)))
    assert use_progress_bar(TTYWithFd())


def test_summary_table():
    from train.reporting import summary_table

    summary = {"steps": 6, "max_steps": 6, "steps_this_session": 6, "preempted": False, "stopped_early": False,
               "tokens_seen": 6144, "wall_seconds": 12.5, "mean_tokens_per_s": 491.5, "mean_mfu": 0.0123,
               "peak_flops_per_rank": 2.0e11, "peak_flops_source": "measured: cpu bfloat16 matmul, 1 threads",
               "peak_rss_gb": 1.234, "peak_gpu_mem_gb": None,
               "best": {"metric": "val/loss", "mode": "min", "value": 5.5, "step": 3},
               "final_val": {"val/loss": 5.6}, "checkpoint": "runs/x/checkpoints/step_6"}
    assert summary_table(summary).splitlines() == [
        "run summary",
        "  steps           6/6 (6 this session)",
        "  tokens          6,144",
        "  wall time       12.5 s",
        "  tokens/s        492 (mean over the session)",
        "  MFU             1.23% of 2e+11 FLOP/s per rank (measured: cpu bfloat16 matmul, 1 threads)",
        "  peak memory     1.23 GB RSS",
        "  best val/loss   5.5000 at step 3",
        "  final val/loss  5.6000",
        "  checkpoint      runs/x/checkpoints/step_6"]


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.report", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_report_plots_the_curves(tmp_path):
    lines = [{"step": s, "time": 0.0, "train/loss": 6.0 - s / 2, "train/lr": 1e-3 * s / 4} for s in range(1, 5)]
    lines += [{"step": 2, "time": 0.0, "val/loss": 5.0, "val/perplexity": 148.4},
              {"step": 4, "time": 0.0, "val/loss": 4.5, "val/perplexity": 90.0, "ckpt/save_seconds": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "tokens_seen": 4096, "mean_mfu": 0.02}))
    proc = report(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'report.png'}\n"
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_errors(tmp_path):
    proc = report(tmp_path / "nope")
    assert (proc.returncode, proc.stderr) == (2, f"error: run directory {tmp_path / 'nope'} does not exist\n")
    proc = report(tmp_path)
    assert (proc.returncode, proc.stderr) == (
        2, f"error: {tmp_path / 'metrics.jsonl'} not found: is {tmp_path} a run directory of train/main.py "
           "(<run.output_dir>/<run.name>)?\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0, "train/loss": 1.0}\nnot json\n')
    proc = report(tmp_path)
    assert (proc.returncode, proc.stderr) == (2, f"error: {tmp_path / 'metrics.jsonl'}:2: not a metrics record\n")
    assert not (tmp_path / "report.png").exists()
