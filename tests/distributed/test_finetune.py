"""Fine-tuning for real, 2 ranks: a local pretrained model, each task, LoRA and freezing, evaluation, early stopping
and the test split."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_training


def test_classification_from_a_pretrained_encoder_learns_stops_early_and_reports_the_test_gain(
        pretrained_models, finetune_data, tmp_path):
    run_training(ROOT / "configs/classify_bert.yaml", [
        f"model.path={pretrained_models['bert']}", f"data.path={finetune_data['cls']}", "data.seq_len=64",
        "optim.lr=1.0e-3", "optim.warmup_steps=5", "train.epochs=6", "eval.early_stopping_patience=1",
        "train.log_every=5", f"run.output_dir={tmp_path}", "run.name=cls"])
    run_dir = tmp_path / "cls"
    results = json.loads((run_dir / "results.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    steps_per_epoch = (480 - 128) // 16
    evals = sorted(s for s, m in metrics.items() if "val/accuracy" in m)
    assert evals == [steps_per_epoch * e for e in range(1, len(evals) + 1)]  # once per epoch
    curve = [metrics[s]["val/accuracy"] for s in evals]
    # Patience 1: the run stops at the first epoch whose accuracy does not beat every earlier one.
    first_stall = next(i for i in range(1, len(curve)) if curve[i] <= max(curve[:i]))
    assert len(evals) == first_stall + 1 < 6 and summary["stopped_early"] and summary["steps"] == evals[-1]
    best = evals[curve.index(max(curve))]
    assert results["best"]["best_step"] == best and results["best"]["metric"] == "val/accuracy"
    assert (run_dir / "checkpoints/best").read_text() == f"step_{best}"
    assert summary["best_checkpoint"] == str(run_dir / f"checkpoints/step_{best}")
    # The test split is scored with the starting model and with the best one.
    assert results["test_after"]["test/accuracy"] >= 0.95
    assert results["test_before"]["test/accuracy"] <= 0.75
    assert results["test_gain"]["test/accuracy"] == pytest.approx(
        results["test_after"]["test/accuracy"] - results["test_before"]["test/accuracy"])
    assert results["test_after"]["test/macro_f1"] >= 0.95


def fp32_weights(run_dir, tag=None) -> dict:
    """The trained fp32 weights, gathered from the ZeRO partitions by DeepSpeed's own converter."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag or (checkpoints / "latest").read_text())


def pretrained_weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_sft_with_lora_on_zero3_trains_adapters_only_and_the_response_loss_falls(pretrained_models, finetune_data,
                                                                                  tmp_path):
    run_training(ROOT / "configs/sft_lora.yaml", [
        f"model.path={pretrained_models['llama']}", f"data.path={finetune_data['sft']}", "data.seq_len=64",
        "finetune.lora_r=8", "finetune.lora_target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj]", "optim.lr=1.0e-2", "optim.warmup_steps=5", "train.epochs=0", "train.max_steps=30",
        "eval.every=10", "checkpoint.every=0", "eval.early_stopping_patience=0", "train.log_every=1",
        f"run.output_dir={tmp_path}", "run.name=sft"])
    run_dir = tmp_path / "sft"
    metrics, results = read_metrics(run_dir), json.loads((run_dir / "results.json").read_text())
    # The base is random and frozen, head and embeddings included, so adapters alone move the loss only so far
    # (6.25 -> 5.99 measured); full fine-tuning of the same model is tested above.
    assert metrics[30]["train/loss"] < metrics[1]["train/loss"] - 0.15
    assert results["test_after"]["test/loss"] < results["test_before"]["test/loss"] - 0.15
    trained, base = fp32_weights(run_dir), pretrained_weights(pretrained_models["llama"])
    prefix = "base_model.model."
    adapters = {k: v for k, v in trained.items() if "lora_" in k}
    assert adapters and all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at 0
    for name, value in base.items():
        key = prefix + name.replace(".weight", ".base_layer.weight") if (
            prefix + name.replace(".weight", ".base_layer.weight")) in trained else prefix + name
        # Bit-identical after training. DeepSpeed keeps no fp32 master of a frozen weight, so under bf16 the
        # checkpoint holds the bf16 cast of the pretrained value.
        assert torch.equal(trained[key], value.to(trained[key].dtype)), name


def test_length_grouped_sft_killed_and_resumed_is_bit_exact(pretrained_models, finetune_data, tmp_path):
    overrides = [f"model.path={pretrained_models['gpt2']}", f"data.path={finetune_data['sft']}", "data.seq_len=64",
                 "data.length_grouping=64", "task.sft_packing=false", "train.epochs=0", "train.max_steps=8",
                 "train.micro_batch_size=4", "train.log_every=1", "checkpoint.every=4", "eval.every=0",
                 "eval.best_metric=''", "eval.early_stopping_patience=0", "data.test_split=''",
                 f"run.output_dir={tmp_path}"]
    run_training(ROOT / "configs/sft_full.yaml", [*overrides, "run.name=reference"])
    killed = run_training(ROOT / "configs/sft_full.yaml", [*overrides, "run.name=run"], check=False,
                          env={"REPARAM_FAULT_AT_STEP": "6"})
    assert killed.returncode != 0 and max(read_metrics(tmp_path / "run")) == 6
    run_training(ROOT / "configs/sft_full.yaml", [*overrides, "run.name=run"])  # resumes from step 4
    reference, resumed = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "run")
    assert [resumed[s]["train/loss"] for s in range(5, 9)] == [reference[s]["train/loss"] for s in range(5, 9)]


def test_freezing_keeps_frozen_weights_bit_identical(pretrained_models, tiny_data, tmp_path):
    run_training(ROOT / "configs/continued_pretrain_freeze.yaml", [
        f"model.path={pretrained_models['gpt2']}", f"data.path={tiny_data['shards']}", "data.seq_len=64",
        "finetune.freeze_bottom_layers=1", "train.max_steps=6", "train.micro_batch_size=4", "train.grad_accum_steps=1",
        "eval.every=0", "checkpoint.every=0", "train.log_every=1", "eval.best_metric=''",
        f"run.output_dir={tmp_path}", "run.name=freeze"])
    run_dir = tmp_path / "freeze"
    trained, base = fp32_weights(run_dir), pretrained_weights(pretrained_models["gpt2"])
    # ZeRO-1 checkpoints keep frozen weights only in the module state (in the training dtype), not in the fp32
    # partitions DeepSpeed's converter reads.
    tag = (run_dir / "checkpoints/latest").read_text()
    module = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    frozen = [k for k in base if k.startswith(("transformer.wte.", "transformer.wpe.", "transformer.h.0."))]
    changed = [k for k in base if k not in frozen and not torch.equal(trained[k], base[k])]
    assert frozen and all(torch.equal(module[k], base[k].to(module[k].dtype)) for k in frozen)
    assert not any(k in trained for k in frozen)
    assert sorted(changed) == sorted(k for k in base if k not in frozen)  # everything else trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
