"""Build the model a run trains: architecture and weights (`model.*`), task head (`task.kind`), and what is
trained (`finetune.*`).

From scratch: a transformers config (`model.model_type` + `model.hf_config`) whose vocabulary comes from the data
manifest, so the model and the shards cannot disagree about token ids. Pretrained: a local HF model dir loaded with
`from_pretrained` in fp32 (DeepSpeed keeps the fp32 master weights and casts the module for bf16/fp16). Under
ZeRO-3 the caller keeps a `HfDeepSpeedConfig` alive first, so transformers builds or loads the model partitioned
*and* initialises it correctly (a bare zero.Init leaves GPT-2 at a loss of ~87 instead of ln(vocab)).
"""

from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from train.config import Config, ModelConfig
from train.errors import ConfigError

# Files that define a HF tokenizer (one list, data_prep's); a model dir that has any of them must agree with the one
# the data was made with.
from data_prep.manifest import TOKENIZER_FILES  # noqa: E402
HEAD_MODULES = {"classification": ("classifier", "score"), "sft": ("lm_head",), "causal_lm": ("lm_head",)}


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
    hf_config.use_cache = False
    return hf_config


def _tokenizer_digest(directory: Path) -> str | None:
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_tokenizer(model_dir: Path, manifest: dict) -> None:
    """Refuse a pretrained model whose tokenizer differs from the one the shards were made with: the token ids
    would mean other words. Compared on the tokenizer files both directories hold, then on the framing (the special
    tokens its post-processor puts around a record, data_prep.encode) the manifest recorded. A model directory
    without tokenizer files cannot be checked and is refused."""
    from data_prep.backend import load_tokenizer
    from data_prep.encode import read_framing
    from data_prep.errors import DataError

    data_dir = Path(manifest["tokenizer"]["path"])
    ours, theirs = _tokenizer_digest(model_dir), _tokenizer_digest(data_dir) if data_dir.is_dir() else None
    if ours is None:
        raise ConfigError(f"model.path: {model_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...), "
                          f"so nothing shows it matches {data_dir}, the tokenizer the shards were made with; copy "
                          f"the model's own tokenizer files into {model_dir}")
    if theirs is not None and ours != theirs:
        raise ConfigError(f"model.path: the tokenizer in {model_dir} differs from {data_dir}, the one the shards were "
                          f"made with; re-run `python -m data_prep tokenize --tokenizer {model_dir}`")
    recorded = manifest.get("framing")
    if recorded is None:  # shards from before framing was recorded
        return
    try:
        framing = read_framing(load_tokenizer(model_dir), recorded["eos"]).as_dict()
    except DataError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    if framing != recorded:
        raise ConfigError(f"model.path: the tokenizer in {model_dir} frames records as {framing['single']} around a "
                          f"text, the shards (made with {data_dir}) as {recorded['single']}; re-run `python -m "
                          f"data_prep tokenize --tokenizer {model_dir}`")


def _override_dropout(hf_config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key, value in hf_config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and (value is None or isinstance(value, float)):
            setattr(hf_config, key, dropout)


def _task_config(hf_config, cfg: Config, manifest: dict) -> None:
    """Settings every task needs from the manifest: the label set for classification, a pad id to batch with."""
    if cfg.task.kind == "classification":
        labels = manifest["classification"]["labels"]
        hf_config.num_labels = len(labels)
        hf_config.id2label = {i: str(label) for i, label in enumerate(labels)}
        hf_config.label2id = {str(label): i for i, label in enumerate(labels)}
    if cfg.task.kind == "classification" or getattr(hf_config, "pad_token_id", None) is None:
        # A decoder's classifier reads the last token that is not pad_token_id: it must be the id our batches are
        # padded with, whatever the pretrained config says.
        hf_config.pad_token_id = pad_id(manifest)
    hf_config.use_cache = False  # no KV cache while training; activation checkpointing requires it off
    _override_dropout(hf_config, cfg.model.dropout)


def pad_id(manifest: dict) -> int:
    """The id batches are padded with: the tokenizer's pad token, else EOS (padding never carries loss)."""
    info = manifest["tokenizer"]
    return info["pad_id"] if info.get("pad_id") is not None else info["eos_id"]


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def _load_pretrained(kind: str, path: Path, hf_config) -> torch.nn.Module:
    try:  # safetensors only: a model directory is never unpickled (a .bin file can run code when loaded)
        return _auto_class(kind).from_pretrained(path, config=hf_config, dtype=torch.float32, use_safetensors=True)
    except OSError as exc:
        raise ConfigError(f"model.path: cannot load {path} ({exc}); convert pickled weights to safetensors "
                          "with save_pretrained in a trusted environment") from None


def build_model(cfg: Config, manifest: dict, base_only: bool = False, load_weights: bool = True) -> torch.nn.Module:
    """The model with its task head, fine-tuning method applied (unless `base_only`) and activation checkpointing
    set. `load_weights=False` builds a pretrained model from its config alone, in the default dtype, without reading
    its weights: the same modules and shapes, for `launcher.memory` to size under fake tensors."""
    from transformers import AutoConfig

    tokenizer_info = manifest["tokenizer"]
    if cfg.model.init == "pretrained":
        path = Path(cfg.model.path)
        if not path.is_dir():
            raise ConfigError(f"model.path: {path} is not a directory (a local HF model dir is needed; model hubs "
                              "are not contacted)")
        check_tokenizer(path, manifest)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: {path} is not a HF model directory ({exc})") from None
        _task_config(hf_config, cfg, manifest)
        if not load_weights:
            model = _auto_class(cfg.task.kind).from_config(hf_config)
        else:
            model = _load_pretrained(cfg.task.kind, path, hf_config)
        rows = model.get_input_embeddings().weight
        rows = getattr(rows, "ds_shape", rows.shape)[0]
        if rows < tokenizer_info["vocab_size"]:
            raise ConfigError(f"model.path: {path} embeds {rows} tokens but the shards' tokenizer has "
                              f"{tokenizer_info['vocab_size']}")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and positions < cfg.data.seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {positions} positions; "
                              "lower it")
    else:
        hf_config = build_hf_config(cfg.model, tokenizer_info, cfg.data.seq_len)
        _task_config(hf_config, cfg, manifest)
        model = _auto_class(cfg.task.kind).from_config(hf_config)
    if cfg.model.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model if base_only else apply_finetune(model, cfg)


def apply_finetune(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """What is trained (finetune.method): everything, the LoRA adapters, or all but the frozen parts."""
    if cfg.finetune.method == "freeze":
        freeze(model, cfg)
    elif cfg.finetune.method == "lora":
        model = add_lora(model, cfg)
    return model


def _layer_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the first ModuleList as long as the config's layer count."""
    layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ConfigError(f"finetune.freeze_bottom_layers: found no list of {layers} layers in {type(model).__name__}")


def head_parameter_names(model: torch.nn.Module, kind: str) -> list[str]:
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in HEAD_MODULES[kind]]
    if not names:
        reason = (" (it is tied to the input embeddings)" if getattr(model.config, "tie_word_embeddings", False)
                  else "")
        raise ConfigError(f"finetune.freeze_all_but_head: {type(model).__name__} has no separate "
                          f"{'/'.join(HEAD_MODULES[kind])} head{reason}")
    return names


def freeze(model: torch.nn.Module, cfg: Config) -> None:
    """Turn off gradients for what finetune.freeze_* names. Frozen parameters get no optimizer state."""
    f = cfg.finetune
    if f.freeze_all_but_head:
        head = set(head_parameter_names(model, cfg.task.kind))
        for name, param in model.named_parameters():
            param.requires_grad_(name in head)
        return
    if f.freeze_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.requires_grad_(False)
    if f.freeze_bottom_layers:
        layers = _layer_list(model)
        if f.freeze_bottom_layers > len(layers):
            raise ConfigError(f"finetune.freeze_bottom_layers={f.freeze_bottom_layers} but the model has "
                              f"{len(layers)} layers")
        for layer in layers[:f.freeze_bottom_layers]:
            layer.requires_grad_(False)


def lora_config(cfg: Config):
    from peft import LoraConfig, TaskType

    f = cfg.finetune
    return LoraConfig(task_type=TaskType.SEQ_CLS if cfg.task.kind == "classification" else TaskType.CAUSAL_LM,
                      r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                      target_modules=list(f.lora_target_modules) or None)


def add_lora(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap with PEFT LoRA adapters; the base weights are frozen, the adapters (and a classification head, which
    PEFT marks modules_to_save) train."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:
        raise ConfigError(f"finetune.lora_target_modules: {exc}") from None


def cast_unpartitioned(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """ZeRO-3: parameters created after the model was loaded partitioned (LoRA adapters, PEFT's trainable copy of a
    classification head) are not partitioned yet and keep the dtype they were made in, while the loaded ones are in
    the training dtype. DeepSpeed partitions them at initialize() but needs one dtype for all trainable parameters
    (ZeRO-1/2 cast the whole module instead), so they are cast here; the optimizer still keeps fp32 masters."""
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.dtype != dtype:
            param.data = param.data.to(dtype)


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


def full_numel(param: torch.Tensor) -> int:
    """A parameter's number of elements, also under ZeRO-3 partitioning (which leaves `param` empty)."""
    return getattr(param, "ds_numel", param.numel())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, also under ZeRO-3 partitioning."""
    trainable = total = 0
    for param in model.parameters():
        n = full_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


# ------------------------------------------------------------------------------------------ dropout on CPU
# torch draws CPU dropout masks one element at a time from its mt19937 generator (it uses MKL only on Intel CPUs):
# ~8 ns per element, a fifth of a GPT-2 training step on the 2-core AMD bench machine, most of it in the attention
# dropout (batch x heads x seq x seq probabilities per layer, drawn again when activation checkpointing
# recomputes). The masks below come from numpy's SFC64 instead (~1.5 ns per element), with the same formula
# (input * keep / (1 - p)) and P(keep) = 1 - p to within 2**-32. Each mask is seeded by one
# draw from torch's default generator, so it is reproduced wherever torch's RNG state is: by the activation
# checkpoint recompute, which restores that state, and by a resumed run, whose checkpoint holds it.


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout's multiplier: 1 / (1 - p) with probability 1 - p, else 0."""
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    count = math.prod(shape)
    bits = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]
    keep = torch.from_numpy(bits >= round(p * 2 ** 32)).view(shape)
    return keep.to(dtype).div_(1 - p)


class CpuDropout(torch.nn.Dropout):
    """nn.Dropout with the mask from `keep_mask` on CPU tensors (elsewhere torch's own, fast there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * keep_mask(x.shape, self.p, x.dtype)


def _cpu_causal_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' "sdpa" attention, except for causal self-attention with dropout on CPU (training), which
    PyTorch can only run on its math path: that path's computation (scores, causal mask, softmax, dropout, values)
    with the dropout mask from `keep_mask`, in fp32 for fp32 inputs. With bf16 inputs the
    math path upcasts both matmuls to fp32, which on a CPU with native bf16 runs them ~5x slower than bf16 (oneDNN;
    they were a quarter of a GPT-2 step); here they run in bf16 like every other matmul of a bf16 run, with the
    scores, mask and softmax in fp32 (Megatron-LM's choice). Everything else goes to transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = not any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap", "sliding_window",
                                                         "s_aux"))
    if not (dropout > 0 and causal and attention_mask is None and plain and query.device.type == "cpu"
            and query.shape == key.shape == value.shape and query.shape[2] > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    root_scale = math.sqrt(scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = ((query * root_scale) @ (key.transpose(-2, -1) * root_scale)).float()
    length = query.shape[2]
    # Added, not masked_fill: as in PyTorch's path, and a broadcast add is ~10x faster and needs no masking pass
    # in the backward (the softmax already gives masked positions a zero gradient).
    future = torch.full((length, length), float("-inf")).triu_(1)
    probs = scores.add_(future).softmax(-1)
    out = (probs * keep_mask(probs.shape, dropout, probs.dtype)).to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), None


def use_cpu_dropout(model: torch.nn.Module) -> None:
    """Route the model's dropout (its nn.Dropout modules and the probability transformers' "sdpa" attention
    receives) through `keep_mask` on CPU. Process-wide for "sdpa": what is not causal self-attention with
    dropout on CPU still runs transformers' own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["sdpa"] = _cpu_causal_sdpa
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, child.inplace))
