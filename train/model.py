"""Build the model a run trains.

From scratch: a transformers config (`model.model_type` + `model.hf_config`) whose vocabulary comes from the data
manifest, so the model and the shards cannot disagree about token ids.
"""

from __future__ import annotations

import difflib

import torch

from train.config import ModelConfig
from train.errors import ConfigError


def build_hf_config(model_cfg: ModelConfig, tokenizer_info: dict, seq_len: int):
    from transformers import AutoConfig

    eos = tokenizer_info["eos_id"]
    bos = tokenizer_info.get("bos_id")
    kwargs = {"vocab_size": tokenizer_info["vocab_size"], "eos_token_id": eos,
              "bos_token_id": eos if bos is None else bos, "pad_token_id": tokenizer_info.get("pad_id")}
    try:
        defaults = AutoConfig.for_model(model_cfg.model_type)
    except ValueError as exc:
        raise ConfigError(f"model.model_type: {exc}") from None
    # transformers configs accept any keyword and keep it as an attribute, so a typo ('n_layers') would silently
    # train the default architecture.
    known = set(defaults.to_dict()) | set(getattr(type(defaults), "attribute_map", {}))
    for key in model_cfg.hf_config:
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"model.hf_config: '{key}' is not a {model_cfg.model_type} config key"
                              + (f"; did you mean '{hint[0]}'?" if hint else ""))
    kwargs.update(model_cfg.hf_config)
    hf_config = AutoConfig.for_model(model_cfg.model_type, **kwargs)
    if hf_config.vocab_size < tokenizer_info["vocab_size"]:
        raise ConfigError(f"model.hf_config.vocab_size={hf_config.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_info['vocab_size']} tokens recorded in the data manifest")
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and positions < seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's {positions} positions; raise "
                          "model.hf_config.n_positions / max_position_embeddings or lower data.seq_len")
    hf_config.use_cache = False  # no KV cache while training; activation checkpointing requires it off
    return hf_config


def build_causal_lm(model_cfg: ModelConfig, hf_config) -> torch.nn.Module:
    """Instantiate from config. Under ZeRO-3 the caller keeps a `HfDeepSpeedConfig` alive first, so transformers
    builds the model inside `deepspeed.zero.Init` *and* initialises the partitioned weights correctly (a bare
    zero.Init leaves GPT-2 at a loss of ~87 instead of ln(vocab))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config)
    model.loss_type = "ForCausalLM"  # transformers otherwise warns that the (unset) loss type is unrecognized
    if model_cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only; biases, norm weights and embeddings are not decayed."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave param.shape empty
        (decay if ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, also under ZeRO-3 partitioning."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
