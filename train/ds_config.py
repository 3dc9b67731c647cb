"""The DeepSpeed config of a run: a ZeRO preset from ds_configs/ plus the values injected from the run config.

Batch sizes, precision and clipping have exactly one source, the run config; a preset that sets them is rejected
instead of silently winning or losing against it.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.config import Config
from train.errors import ConfigError
from train.precision import CONCRETE

INJECTED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


PRESET_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def load_preset(path: str | Path) -> dict:
    """Read a preset; a relative path is looked up in the working directory, then in the project's ds_configs/."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (PRESET_DIR.parent / path).is_file():
        path = PRESET_DIR.parent / path
    if not path.is_file():
        presets = sorted(p.name for p in PRESET_DIR.glob("*.json"))
        raise ConfigError(f"train.deepspeed_config: {path} not found (presets: {', '.join(presets) or 'none'})")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: a DeepSpeed preset is a JSON object ({{...}}), got a {type(preset).__name__}")
    zero = preset.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    clashes = [key for key in INJECTED_KEYS if key in preset]
    if clashes:
        raise ConfigError(f"{path}: sets {', '.join(clashes)}, which come from the run config (train.* / optim.*); "
                          "remove them from the preset")
    return preset


def build(cfg: Config, world_size: int) -> dict:
    """The full DeepSpeed config for this run at this world size."""
    ds = load_preset(cfg.train.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.train.precision not in CONCRETE:
        raise ValueError(f"train.precision {cfg.train.precision!r} must be resolved first (train.precision.resolve)")
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    # loss_scale 0: dynamic loss scaling, starting at 2**16 and halved on each overflow.
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
