"""Run configuration: typed dataclasses, loaded from YAML plus dotted `key=value` overrides.

Every field carries its documentation in `metadata["doc"]` (`python -m train.main --help-config` prints them) and
whether a resumed run may change it (`metadata["on_resume"]`: `train.resume` refuses a checkpoint whose breaking
fields differ). A field whose type is a `Literal` accepts only those values. Validation happens in `__post_init__`
so a bad value fails before any process group or model exists. Unknown keys are an error that names the key and the
nearest valid one, because a silently ignored typo (`max_step: 10`) costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import types
import typing

import yaml

from train.errors import ConfigError


# on_resume values: "allowed" (reported when it changed), "breaking" (a resumed run must keep it: it changes the model,
# its data or its numerics).
ALLOWED, BREAKING = "allowed", "breaking"


def _field(default: Any, doc: str, on_resume: str):
    """A documented config field; `on_resume` (ALLOWED or BREAKING) has no default, so that every new field says
    whether a resumed run may change it."""
    metadata = {"doc": doc, "on_resume": on_resume}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _choices(expected: Any) -> tuple | None:
    """The allowed values of a Literal type, else None."""
    return typing.get_args(expected) if typing.get_origin(expected) is Literal else None


class _Section:
    """A config section: checks its Literal fields, then runs the section's own `validate`."""

    SECTION = ""

    def __post_init__(self):
        for name, expected in typing.get_type_hints(type(self)).items():
            choices = _choices(expected)
            if choices is not None:
                value = getattr(self, name)
                _require(value in choices, f"{self.SECTION}.{name}",
                         f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Checks across fields and ranges (the Literal choices are already checked)."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _finite(value: float) -> bool:
    """A finite number (nan and inf fail every range check below)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunConfig(_Section):
    SECTION = "run"
    name: str = _field("", "Run name; the run directory is <output_dir>/<name>. Defaults to the config file's "
                           "stem.", ALLOWED)
    output_dir: str = _field("runs", "Directory that holds one sub-directory per run.", ALLOWED)
    seed: int = _field(1234, "Seed for model init, data order and dropout (each rank offsets it by its rank).",
                       BREAKING)
    resume: Literal["auto", "never", "require"] = _field(
        "auto", "'auto': continue from the run directory's latest checkpoint if one exists; 'never': refuse to start "
                "if the run directory already has checkpoints; 'require': continue the latest checkpoint and fail if "
                "there is none (a requeued job that must not silently start over).", ALLOWED)

    def validate(self):
        _require(bool(self.output_dir), "run.output_dir", "must not be empty")
        _require(0 <= self.seed < 2 ** 63, "run.seed", f"must be in [0, 2**63), got {self.seed}")


TaskKind = Literal["causal_lm", "sft", "classification"]
# The data_prep record kind each task trains on.
RECORD_KIND_OF_TASK = {"causal_lm": "text", "sft": "sft", "classification": "classification"}


@dataclass
class TaskConfig(_Section):
    SECTION = "task"
    kind: TaskKind = _field("causal_lm", "causal_lm (pretraining / continued pretraining on text shards), sft (loss "
                                         "on response tokens only, sft shards) or classification (sequence "
                                         "classification, classification shards). Must match the shards' record "
                                         "kind.", BREAKING)
    sft_packing: bool = _field(True, "sft: pack the micro-batch's examples into as few rows of data.seq_len as "
                                     "possible; each example attends only to itself (block-diagonal mask, positions "
                                     "restart). false pads every example to its own row.", BREAKING)
    label_smoothing: float = _field(0.0, "classification: label smoothing of the cross-entropy loss.", BREAKING)

    def validate(self):
        _require(0.0 <= self.label_smoothing < 1.0, "task.label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")


@dataclass
class ModelConfig(_Section):
    SECTION = "model"
    init: Literal["scratch", "pretrained"] = _field(
        "scratch", "scratch: build model.model_type from model.hf_config with random weights; pretrained: load the "
                   "local HF model dir model.path. Continuing a run from its checkpoint is run.resume (auto by "
                   "default), on top of either.", BREAKING)
    path: str = _field("", "init: pretrained: a local HF model directory (from save_pretrained or train.export).",
                       BREAKING)
    model_type: str = _field("gpt2", "init: scratch: transformers model type (gpt2, llama, bert, ...).", BREAKING)
    hf_config: dict = _field({}, "init: scratch: keyword arguments for the transformers config (n_layer, n_embd, "
                                 "...). vocab_size and eos/bos ids are taken from the data manifest unless set here.",
                             BREAKING)
    dropout: float | None = _field(None, "Override every dropout probability of the model config (hidden, "
                                         "attention, embedding, classifier); null keeps the model's own.", BREAKING)
    activation_checkpointing: bool = _field(True, "Recompute activations in the backward pass to save memory.",
                                            BREAKING)

    def validate(self):
        _require(isinstance(self.hf_config, dict), "model.hf_config", "must be a mapping of config keys")
        if self.init == "pretrained":
            _require(bool(self.path), "model.path", "is required with model.init: pretrained (a local HF model dir)")
            _require(not self.hf_config, "model.hf_config", "applies to init: scratch only; a pretrained model "
                                                            "brings its own config")
        _require(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout",
                 f"must be null or in [0, 1), got {self.dropout}")


@dataclass
class FinetuneConfig(_Section):
    SECTION = "finetune"
    method: Literal["full", "lora", "freeze"] = _field(
        "full", "full: train every parameter; lora: train LoRA adapters (PEFT) and, for classification, the head; "
                "freeze: train everything but what the freeze_* keys name.", BREAKING)
    lora_r: int = _field(8, "lora: adapter rank.", BREAKING)
    lora_alpha: float = _field(16.0, "lora: scaling numerator (the update is scaled by lora_alpha / lora_r).",
                               BREAKING)
    lora_dropout: float = _field(0.05, "lora: dropout on the adapter input.", BREAKING)
    lora_target_modules: list = _field([], "lora: module names to adapt (e.g. [q_proj, v_proj]); empty uses PEFT's "
                                           "default for the model type.", BREAKING)
    freeze_embeddings: bool = _field(False, "freeze: freeze the input embeddings (and position embeddings).",
                                     BREAKING)
    freeze_bottom_layers: int = _field(0, "freeze: freeze the first N transformer layers.", BREAKING)
    freeze_all_but_head: bool = _field(False, "freeze: train only the task head (classifier / score; for "
                                              "causal_lm an untied lm_head).", BREAKING)

    def validate(self):
        _require(self.lora_r >= 1, "finetune.lora_r", f"must be >= 1, got {self.lora_r}")
        _require(_finite(self.lora_alpha) and self.lora_alpha > 0, "finetune.lora_alpha",
                 f"must be > 0, got {self.lora_alpha}")
        _require(all(isinstance(m, str) and m for m in self.lora_target_modules), "finetune.lora_target_modules",
                 f"must be a list of module names, got {self.lora_target_modules}")
        _require(0.0 <= self.lora_dropout < 1.0, "finetune.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _require(self.freeze_bottom_layers >= 0, "finetune.freeze_bottom_layers",
                 f"must be >= 0, got {self.freeze_bottom_layers}")
        freezes = self.freeze_embeddings or self.freeze_bottom_layers or self.freeze_all_but_head
        if self.method == "freeze":
            _require(bool(freezes), "finetune.method",
                     "is freeze but nothing is frozen; set freeze_embeddings, freeze_bottom_layers or "
                     "freeze_all_but_head")
        else:
            _require(not freezes, "finetune.method", f"is {self.method}; the freeze_* keys need method: freeze")


@dataclass
class DataConfig(_Section):
    SECTION = "data"
    path: str = _field("", "Directory written by `python -m data_prep tokenize` (holds manifest.json), or a blend "
                           "spec file (`<shard dir>: <weight>` per line, see docs/data_prep.md) to sample several "
                           "shard directories in proportion; every split is read from each part.", ALLOWED)
    seq_len: int = _field(512, "Tokens per training sequence; shards are cut into windows of this length.", BREAKING)
    train_split: str = _field("train", "Split of the manifest used for training.", BREAKING)
    val_split: str = _field("val", "Split used for validation loss; empty string disables validation.", ALLOWED)
    test_split: str = _field("", "Split evaluated with the starting model before training and with the best (or "
                                 "final) model at the end, reported in results.json; empty disables.", ALLOWED)
    length_grouping: int = _field(0, "sft and classification: when > 0, each run of this many examples of the "
                                     "shuffled epoch order is sorted by length (longest first), so a micro-batch "
                                     "holds examples of similar length and pads little; e.g. 50 x the global batch. "
                                     "The order stays seeded and resumes exactly. 0 = off.", BREAKING)

    def validate(self):
        _require(bool(self.path), "data.path", "is required: the output directory of `python -m data_prep tokenize`")
        _require(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.length_grouping >= 0, "data.length_grouping", f"must be >= 0, got {self.length_grouping}")
        _require(bool(self.train_split), "data.train_split", "must not be empty (the manifest split to train on)")


@dataclass
class OptimConfig(_Section):
    SECTION = "optim"
    lr: float = _field(3e-4, "Peak learning rate, reached after warmup_steps.", ALLOWED)
    min_lr: float = _field(3e-5, "Learning rate at the end of the cosine decay.", ALLOWED)
    warmup_steps: int = _field(100, "Optimizer steps of linear warmup from 0 to lr.", ALLOWED)
    weight_decay: float = _field(0.1, "AdamW weight decay, applied to matrices only (not biases, norms, "
                                      "embeddings).", ALLOWED)
    betas: list = _field([0.9, 0.95], "AdamW betas.", ALLOWED)
    eps: float = _field(1e-8, "AdamW epsilon.", ALLOWED)
    grad_clip: float = _field(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", ALLOWED)

    def validate(self):
        _require(_finite(self.lr) and self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr], got {self.min_lr}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "optim.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(_finite(self.eps) and self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(_finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip",
                 f"must be >= 0, got {self.grad_clip}")


def _at_least(section: _Section, minimum: int, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        _require(value >= minimum, f"{section.SECTION}.{key}", f"must be >= {minimum}, got {value}")


@dataclass
class TrainConfig(_Section):
    """The training loop: how long, how big a step, in what precision, on which ZeRO preset."""
    SECTION = "train"
    max_steps: int = _field(1000, "Optimizer steps to train for (ignored when epochs > 0).", ALLOWED)
    epochs: int = _field(0, "When > 0, train for this many passes over the training split instead of max_steps "
                            "(max_steps = epochs x optimizer steps per epoch).", ALLOWED)
    micro_batch_size: int = _field(8, "Sequences per rank per forward/backward pass.", ALLOWED)
    grad_accum_steps: int = _field(1, "Micro-batches accumulated per optimizer step. "
                                      "Global batch = micro_batch_size * grad_accum_steps * world size.", ALLOWED)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _field(
        "auto", "auto: bf16 on a GPU that supports it, else fp16 (dynamic loss scaling); on CPU bf16 only where its "
                "matmuls are fast (x86 CPU flags, else a short probe), else fp32. bf16, fp16 or fp32 force one (fp16 "
                "does not run on CPU). The choice and its reason are printed, kept in summary.json and the "
                "checkpoint; a resumed run keeps its checkpoint's precision.", BREAKING)
    deepspeed_config: str = _field("ds_configs/zero2.json", "ZeRO preset from ds_configs/; batch sizes, precision "
                                                            "and clipping are injected from this run config.",
                                   BREAKING)
    log_every: int = _field(10, "Optimizer steps between log lines / TensorBoard points.", ALLOWED)
    nonfinite_max_in_a_row: int = _field(3, "A non-finite loss or gradient skips the update; this many in a row "
                                            "roll back to the last checkpoint and skip the offending batches.", ALLOWED)
    nonfinite_max_rollbacks: int = _field(2, "Rollbacks allowed before the run stops with a report.", ALLOWED)
    fast_cpu_dropout: bool = _field(True, "On CPU, draw dropout masks (nn.Dropout and causal attention dropout) "
                                          "from a seeded numpy stream instead of torch's per-element generator: "
                                          "same formula and probability, other masks, reproducible on resume; ~15% "
                                          "faster GPT-2 steps on a CPU without MKL's generator (AMD). No effect on "
                                          "GPU. false: torch's dropout.", ALLOWED)
    collective_timeout_s: int = _field(600, "Seconds a collective may wait for the other ranks before the run "
                                            "fails; bounds the hang when a rank or node dies.", ALLOWED)

    def validate(self):
        _at_least(self, 1, "max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "nonfinite_max_in_a_row",
                  "collective_timeout_s")
        _at_least(self, 0, "nonfinite_max_rollbacks", "epochs")


@dataclass
class EvalConfig(_Section):
    """Validation during training, the best checkpoint, early stopping."""
    SECTION = "eval"
    every: int = _field(100, "Optimizer steps between validation passes; 0 evaluates only at the end.", ALLOWED)
    at_epoch_end: bool = _field(True, "Also evaluate after the last optimizer step of every epoch.", ALLOWED)
    batches: int = _field(20, "Micro-batches per rank in one validation pass; 0 evaluates the whole split.", ALLOWED)
    best_metric: str = _field("", "Validation metric that picks the best checkpoint (val/loss, val/accuracy, "
                                  "val/macro_f1, ...): a checkpoint is saved at each new best, kept by retention, "
                                  "and used for the test split and `train.export --step best`. Empty disables.",
                              ALLOWED)
    best_mode: Literal["min", "max"] = _field("min", "min or max: whether a lower or higher best_metric is better.",
                                              ALLOWED)
    early_stopping_patience: int = _field(0, "Stop after this many validation passes without a new best "
                                             "best_metric; 0 never stops early.", ALLOWED)

    def validate(self):
        _at_least(self, 0, "every", "batches", "early_stopping_patience")
        _require(not self.early_stopping_patience or bool(self.best_metric), "eval.early_stopping_patience",
                 "needs eval.best_metric (the metric whose improvement it waits for)")
        _require(not self.best_metric or self.best_metric.startswith("val/"), "eval.best_metric",
                 f"must be a validation metric (val/...), got {self.best_metric!r}")


@dataclass
class CheckpointConfig(_Section):
    """When checkpoints are written and which are kept."""
    SECTION = "checkpoint"
    every: int = _field(500, "Optimizer steps between checkpoints; a checkpoint is always written at the end.", ALLOWED)
    keep_last: int = _field(0, "Checkpoints to keep (the newest ones); 0 keeps all. The newest is never deleted.",
                            ALLOWED)
    keep_every: int = _field(0, "Also keep every checkpoint whose step is a multiple of this (with keep_last); "
                                "0 disables.", ALLOWED)

    def validate(self):
        _at_least(self, 0, "every", "keep_last", "keep_every")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _require(not self.eval.best_metric or bool(self.data.val_split), "eval.best_metric",
                 "needs a validation split (data.val_split) to measure it on")
        _require(not self.data.length_grouping or self.task.kind != "causal_lm", "data.length_grouping",
                 "groups sft and classification examples; causal_lm windows all hold data.seq_len tokens (set 0)")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the resolved config; recorded in checkpoints and the run summary."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_SECTION_CLASSES = {"run": RunConfig, "task": TaskConfig, "model": ModelConfig, "finetune": FinetuneConfig,
                    "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
                    "checkpoint": CheckpointConfig}

# Keys that moved when `train` was split into train / eval / checkpoint: configs and overrides written with the old
# names keep working (each is read as its new key; a config file that gives both is an error).
MOVED_KEYS = {f"train.{old}": new for old, new in {
    "eval_every": "eval.every", "eval_at_epoch_end": "eval.at_epoch_end", "eval_batches": "eval.batches",
    "best_metric": "eval.best_metric", "best_mode": "eval.best_mode",
    "early_stopping_patience": "eval.early_stopping_patience", "save_every": "checkpoint.every",
    "keep_last": "checkpoint.keep_last", "keep_every": "checkpoint.keep_every"}.items()}


def breaking_keys() -> set[str]:
    """Dotted keys a resumed run must not change (declared on each field)."""
    return {f"{section}.{f.name}" for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)
            if f.metadata["on_resume"] == BREAKING}


def field_defaults() -> dict[str, Any]:
    """Every dotted key's default, which is also what a run saved before the key existed ran with."""
    return {f"{section}.{f.name}": f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)}


def _one_line(text: str) -> str:
    """`text` for an error message: as is, or with control characters (a newline in an override) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _unknown_key(source: str, key: str, valid: list[str]) -> ConfigError:
    key = _one_line(str(key))  # YAML keys may be numbers, booleans or null
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{source}: unknown key '{key}'{suggestion}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _check_duplicates(loader: yaml.SafeLoader, node: yaml.Node, prefix: str, visited: set) -> None:
    """Raise _DuplicateKey for a key given twice in one mapping (PyYAML would silently keep the last one, so a
    second `train:` section would drop the first). Keys are named dotted from the root (`train.max_steps`)."""
    if id(node) in visited:  # an alias to a node already checked (also ends recursive structures)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            name = prefix
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node, deep=True)
                name = f"{prefix}{key}"
                line = key_node.start_mark.line + 1
                if key in first:
                    raise _DuplicateKey(name, first[key], line)
                first[key] = line
            _check_duplicates(loader, value_node, name + "." if name else "", visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(loader, item, prefix, visited)


def _yaml_load(text: str):
    """yaml.safe_load that refuses duplicate keys (_DuplicateKey)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, with_line: bool = True) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}" if with_line else f"column {mark.column + 1}"
    context = getattr(exc, "context", None)
    return f"{problem} at {where}" + (f", {context}" if context else "")


def apply_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to the raw nested dict."""
    shown = _one_line(override)
    if "=" not in override:
        raise ConfigError(f"override '{shown}': expected section.key=value, e.g. train.max_steps=100")
    dotted, value = override.split("=", 1)
    parts = MOVED_KEYS.get(dotted.strip(), dotted.strip()).split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{shown}': expected section.key=value, e.g. train.max_steps=100")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`train:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{shown}': '{_one_line(part)}' is not a section")
    try:
        node[parts[-1]] = _yaml_load(value)
    except _DuplicateKey as dup:
        raise ConfigError(f"override '{shown}': duplicate key '{_one_line(dup.key)}' in the value; "
                          "keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{shown}': the value is not valid YAML ({_yaml_problem(exc, False)}); "
                          "quote a value that holds YAML syntax, e.g. 'run.name=\"[x]\"'") from None


def _coerce(source: str, key: str, value: Any, expected: type) -> Any:
    """Check a value's type. YAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`), so numeric strings are
    accepted for float fields instead of failing later with a confusing comparison error."""
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    elif expected is str and value is None:  # `data.val_split=` / `val_split:` (YAML null) means empty
        return ""
    elif expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    choices = _choices(expected)
    if choices is not None:  # which values are allowed is checked by the section (_Section)
        expected = type(choices[0])
    if typing.get_origin(expected) in (typing.Union, types.UnionType):  # `float | None`
        if value is None:
            return None
        expected = next(t for t in typing.get_args(expected) if t is not type(None))
        return _coerce(source, key, value, expected)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def _with_moved_keys(raw: dict, source: str) -> dict:
    """`raw` with every key of MOVED_KEYS under its new name."""
    raw = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        if not isinstance(raw.get(old_section), dict) or old_key not in raw[old_section]:
            continue
        new_section, new_key = new.split(".")
        target = raw.get(new_section)
        if target is None:
            target = raw[new_section] = {}
        if not isinstance(target, dict):
            continue  # from_dict names the section that is not a mapping
        if new_key in target:
            raise ConfigError(f"{source}: {old} and {new} are the same setting ({old} is its old name); keep {new}")
        target[new_key] = raw[old_section].pop(old_key)
    return raw


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a Config; every key must be known."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(_SECTION_CLASSES)})")
    raw = _with_moved_keys(raw, source)
    sections = {}
    for name, values in raw.items():
        if name not in _SECTION_CLASSES:
            raise _unknown_key(source, name, list(_SECTION_CLASSES))
        cls = _SECTION_CLASSES[name]
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(values).__name__}")
        types = typing.get_type_hints(cls)
        for key in values:
            if key not in types:
                raise _unknown_key(source, f"{name}.{key}", _all_keys())
        sections[name] = cls(**{key: _coerce(source, f"{name}.{key}", value, types[key])
                                for key, value in values.items()})
    return Config(**sections)


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML run config, apply overrides, validate. The run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save the config "
                          "as UTF-8") from None
    try:
        raw = _yaml_load(text)
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: duplicate key '{_one_line(dup.key)}' at lines {dup.first} and {dup.second}; keep "
                          "one (YAML would silently use the last)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(raw), "value")
        raise ConfigError(f"{path}: must be a YAML mapping of sections ({', '.join(_SECTION_CLASSES)}), got a "
                          f"{what}")
    raw = _with_moved_keys(raw, str(path))
    for override in overrides:
        apply_override(raw, override)
    if raw.get("run") is None:
        raw["run"] = {}
    if isinstance(raw["run"], dict) and not raw["run"].get("name"):
        raw["run"]["name"] = path.stem
    return from_dict(raw, source=str(path))


def describe() -> str:
    """Every key with its default and documentation, for --help-config."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fixed = " Fixed for the run: a resumed run must keep it." if f.metadata["on_resume"] == BREAKING else ""
            lines.append(f"  {f.name} (default {default!r}): {f.metadata['doc']}{fixed}")
    lines.append("old names still read: " + ", ".join(f"{old} (now {new})" for old, new in MOVED_KEYS.items()))
    return "\n".join(lines)
