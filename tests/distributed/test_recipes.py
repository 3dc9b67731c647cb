"""Every shipped recipe in configs/ runs: 2 optimizer steps on the tiny fixtures, 1 rank, its own task, method,
ZeRO stage and precision, with only paths, sizes and step counts overridden."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import ROOT, TINY_MODEL, run_training

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs(recipe, tiny_data, finetune_data, pretrained_models, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    kind = raw.get("task", {}).get("kind", "causal_lm")
    finetune = raw.get("finetune", {})
    data = {"causal_lm": tiny_data["shards"], "sft": finetune_data["sft"], "classification": finetune_data["cls"]}
    overrides = [f"data.path={data[kind]}", "data.seq_len=64", "train.epochs=0", "train.max_steps=2",
                 "train.micro_batch_size=2", "train.grad_accum_steps=1", "eval.every=0", "eval.batches=2",
                 "checkpoint.every=0", f"run.output_dir={tmp_path}", "run.name=recipe"]
    if raw.get("model", {}).get("init") == "pretrained":
        model = "bert" if kind == "classification" and finetune.get("method") != "lora" else "gpt2"
        overrides.append(f"model.path={pretrained_models[model]}")
    else:
        overrides += [o for o in TINY_MODEL if o.startswith("model.")]
    if finetune.get("freeze_bottom_layers"):
        overrides.append("finetune.freeze_bottom_layers=1")
    run_training(recipe, overrides, num_ranks=1)
    summary = json.loads((tmp_path / "recipe/summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_train_loss"] == summary["final_train_loss"]  # not NaN
