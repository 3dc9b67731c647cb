"""train.ds_config: the DeepSpeed config of a run, a ZeRO preset from ds_configs/ plus what the run config injects
(batch sizes, precision, clipping) exactly once; a preset may not set those, and `auto` precision must be resolved
before it reaches DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from train import config, ds_config
from train.errors import ConfigError


def write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_preset_may_not_set_injected_keys(tmp_path):
    preset = tmp_path / "bad.json"
    preset.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(ConfigError) as err:
        ds_config.load_preset(preset)
    assert str(err.value) == (f"{preset}: sets train_micro_batch_size_per_gpu, which come from the run config "
                              "(train.* / optim.*); remove them from the preset")


def test_batch_sizes_precision_and_clipping_are_injected_once(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain: {micro_batch_size: 4, grad_accum_steps: 3, "
                           "precision: bf16, deepspeed_config: ds_configs/zero3.json}\noptim: {grad_clip: 0.5}\n")
    ds = ds_config.build(config.load(path), world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (4, 3, 24)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    assert ds_config.zero_stage(ds) == 3


def test_an_unresolved_precision_never_reaches_deepspeed(tmp_path):
    cfg = config.load(write(tmp_path, "data: {path: shards}\n"))
    assert cfg.train.precision == "auto"  # the default
    with pytest.raises(ValueError, match="must be resolved first"):
        ds_config.build(cfg, world_size=2)


@pytest.mark.parametrize("preset", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_preset_builds_the_zero_stage_it_is_named_for_with_the_run_batch(preset, tmp_path):
    cfg = config.load(write(tmp_path, f"data: {{path: shards}}\ntrain: {{micro_batch_size: 3, grad_accum_steps: 2, "
                                      f"precision: fp32, deepspeed_config: {preset}}}\n"))
    built = ds_config.build(cfg, world_size=4)
    assert ds_config.zero_stage(built) == int(preset.stem.removeprefix("zero"))
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"],
            built["train_batch_size"]) == (3, 2, 24)
    # Everything the preset sets reaches DeepSpeed unchanged; the run config only adds.
    assert {k: built[k] for k in ds_config.load_preset(preset)} == ds_config.load_preset(preset)
