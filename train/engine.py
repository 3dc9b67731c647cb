"""The model wrapped in its DeepSpeed engine: built (or loaded), adapted for the fine-tuning method, cast, and handed
to DeepSpeed with its optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import psutil
import torch

from train import ds_config as ds_config_lib
from train.config import Config
from train.flops import ModelFlops, model_flops
from train.model import build_model, cast_unpartitioned, count_parameters, param_groups, use_cpu_dropout
from train.precision import dtype_of
from train.rng import seed_everything


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # DeepSpeed's wrapper: its param_groups carry the learning rate
    trainable_params: int
    total_params: int
    flops: ModelFlops
    rss_before_model_gb: float  # what the process held before any model state (see below)
    zero3_init: object | None  # transformers' HfDeepSpeedConfig, which must stay referenced under ZeRO-3


def build_engine(cfg: Config, manifest: dict, ds_config: dict) -> Engine:
    """The same initial weights (and new heads, adapters) on every rank: seeded with run.seed alone."""
    seed_everything(cfg.run.seed)
    zero3_init = None
    zero3 = ds_config_lib.zero_stage(ds_config) == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must stay referenced while the model is built: transformers checks it to partition at init.
        zero3_init = HfDeepSpeedConfig(ds_config)
    # What the process holds before any model state (interpreter, torch, DeepSpeed, the data index, and
    # transformers' ~100 MB of model code, imported here rather than inside build_model): `python -m launcher
    # plan --probe` compares its prediction with the peak above this.
    import transformers.modeling_utils  # noqa: F401
    rss_before_model_gb = psutil.Process().memory_info().rss / 1e9
    model = build_model(cfg, manifest)
    if cfg.train.fast_cpu_dropout and not torch.cuda.is_available():
        use_cpu_dropout(model)
    if zero3 and cfg.train.precision != "fp32":
        cast_unpartitioned(model, dtype_of(cfg.train.precision))
    trainable, total = count_parameters(model)
    flops = model_flops(model, cfg.data.seq_len)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return Engine(engine, optimizer, trainable, total, flops, rss_before_model_gb, zero3_init)


def forward(engine: deepspeed.DeepSpeedEngine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits for a batch (its labels already removed), its tensors moved to the engine's device."""
    device = engine.device
    return engine(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).logits
