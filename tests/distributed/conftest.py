"""Fixtures of the distributed tier: four short 2-rank trainings that tests/distributed/test_export.py and
test_predict.py share (each built on first use, once per session)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL, run_training

BASE = ("data:\n  seq_len: 64\n  test_split: ''\noptim:\n  lr: 3.0e-3\n  warmup_steps: 2\ntrain:\n"
        "  micro_batch_size: 4\n  log_every: 1\n  eval_every: 0\n  eval_batches: 2\n  save_every: 0\n"
        "  precision: fp32\n")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    (root / "base.yaml").write_text(BASE)
    return root


def train(runs, name: str, overrides: list[str]):
    run_dir = runs / name
    if not (run_dir / "summary.json").is_file():
        run_training(runs / "base.yaml", [*overrides, f"run.output_dir={runs}", f"run.name={name}"])
    return run_dir


@pytest.fixture(scope="session")
def zero2_run(runs, tiny_data):
    """Causal LM from scratch, ZeRO-2, fp32; checkpoints at steps 3 and 6."""
    return train(runs, "zero2", [*TINY_MODEL, f"data.path={tiny_data['shards']}", "train.max_steps=6",
                                 "checkpoint.every=3", "train.deepspeed_config=ds_configs/zero2.json"])


@pytest.fixture(scope="session")
def zero3_run(runs, finetune_data, pretrained_models):
    """sft on the pretrained llama with frozen embeddings, ZeRO-3, fp32 (frozen parameters are partitioned too)."""
    return train(runs, "zero3", ["task.kind=sft", "model.init=pretrained", f"model.path={pretrained_models['llama']}",
                                 f"data.path={finetune_data['sft']}", "finetune.method=freeze",
                                 "finetune.freeze_embeddings=true", "train.max_steps=4", "eval.batches=0",
                                 "train.deepspeed_config=ds_configs/zero3.json"])


@pytest.fixture(scope="session")
def lora_run(runs, finetune_data, pretrained_models):
    """LoRA classification on the pretrained gpt2, ZeRO-1 (which stores no frozen parameters in its partitions),
    fp32, best checkpoint tracked."""
    return train(runs, "lora", ["task.kind=classification", "model.init=pretrained",
                                f"model.path={pretrained_models['gpt2']}", f"data.path={finetune_data['cls']}",
                                "finetune.method=lora", "train.max_steps=6", "eval.every=2",
                                "eval.batches=0", "eval.best_metric=val/loss",
                                "train.deepspeed_config=ds_configs/zero1.json"])


@pytest.fixture(scope="session")
def zero0_bf16_run(runs, tiny_data, pretrained_models):
    """Continued pretraining of the pretrained gpt2 with its first block frozen, ZeRO-0, bf16."""
    return train(runs, "zero0", ["model.init=pretrained", f"model.path={pretrained_models['gpt2']}",
                                 f"data.path={tiny_data['shards']}", "finetune.method=freeze",
                                 "finetune.freeze_bottom_layers=1", "train.max_steps=3", "train.precision=bf16",
                                 "train.deepspeed_config=ds_configs/zero0.json"])
