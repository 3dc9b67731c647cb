"""Export a run's checkpoint as a plain HuggingFace model directory.

    python -m train.export RUN_DIR [--step N|best|latest] --output DIR [--no-merge] [--overwrite]

DIR then loads with `AutoModelForCausalLM.from_pretrained(DIR)` (causal_lm, sft) or
`AutoModelForSequenceClassification.from_pretrained(DIR)` (classification), without DeepSpeed and without this
project. It holds `config.json` (the run's architecture and task head, labels included, `use_cache: true`),
`model.safetensors`, the tokenizer files the shards were made with (byte for byte, so DIR also works as
`model.path` of a new run on the same shards) and `export.json` (where it came from; `train.predict` reads it).

Weights are the fp32 master weights, whatever the ZeRO stage and precision:
- ZeRO-1/2/3: DeepSpeed's `zero_to_fp32` gathers the fp32 partitions of the trainable parameters. Frozen
  parameters (LoRA's base, `finetune.method: freeze`) have no fp32 master: ZeRO-2/3 store them in the training
  precision and `zero_to_fp32` returns those, ZeRO-1 does not store them at all and they come from the module
  weights in `mp_rank_00_model_states.pt`.
- ZeRO-0: the module weights in `mp_rank_00_model_states.pt` (fp32 runs), with the trainable parameters replaced by
  the fp32 copies DeepSpeed's bf16/fp16 optimizer keeps (`optimizer.fp32_groups`, in the order of
  `train.model.param_groups`).
- A frozen parameter stored in bf16/fp16 whose base-model value (model.init: pretrained) rounds to exactly the
  stored value is taken from the base model in fp32: it is the same, never-updated weight without the rounding.
Every tensor gathered from fp32 masters is checked against the module weights of the checkpoint where those are
stored (ZeRO-0/1/2): cast to the training precision they must be equal, so a wrong mapping cannot go unnoticed. The
result is loaded into `train.model.build_model(config, manifest)` with strict key matching.

LoRA runs: merged into the base weights (`merge_and_unload`) by default; `--no-merge` writes the PEFT adapter
(`adapter_config.json`, `adapter_model.safetensors`, the classification head included as `modules_to_save`) plus
the tokenizer and prints how to load it over the base model.

The directory is written under a temporary name next to DIR and renamed at the end; an interrupted export leaves
nothing half-written at DIR. `export.json` records every file's xxh3-128 checksum; `train.predict` checks them.
`--overwrite` replaces only an earlier export (a directory holding our `export.json`): never the run directory or a
directory holding it, the current directory or one of its parents, the run's base model or tokenizer, a symbolic
link, or any other directory. Errors a user can fix print one line `error: ...` and exit with code 2.

The checkpoint is checked before anything in it is unpickled (train.checkpoint.verify, docs/security.md): its name is
`step_<N>` (`--step best` reads `checkpoints/best`, which must hold exactly that), it is a real directory in
`RUN_DIR/checkpoints/` with no symbolic link inside, and every file matches the size and checksum in its
`checkpoint.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python train/export.py`: make the project root importable, as train/main.py does
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
import yaml  # noqa: E402

from data_prep.files import atomic_directory  # noqa: E402
from train import exit_codes  # noqa: E402
from train import run_dir as layout  # noqa: E402
from train.checkpoint import BEST, CHECKSUM, LATEST, Checkpointer, file_checksum, tag_for, verify  # noqa: E402
from train.errors import RunError  # noqa: E402

EXPORT_INFO = "export.json"  # where an export came from; train.predict reads it
LOW_PRECISION = (torch.bfloat16, torch.float16)


class ExportError(RunError):
    """A run or checkpoint that cannot be exported; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ the run


def load_run(run_dir: str | Path):
    """(Config, data manifest) of a run directory, as the trainer wrote them."""
    from train import config as config_lib

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    config_path, manifest_path = run_dir / layout.CONFIG, run_dir / layout.DATA_MANIFEST
    if not config_path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no {layout.CONFIG}); give <run.output_dir>/<run.name>")
    if not manifest_path.is_file():
        raise ExportError(f"{manifest_path}: missing; the trainer writes it at the start of a run (a run made by an "
                          "older version has none: re-run the training command once to write it)")
    try:
        raw = yaml.safe_load(config_path.read_text())
        manifest = json.loads(manifest_path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ExportError(f"{run_dir}: {layout.CONFIG} or {layout.DATA_MANIFEST} is unreadable ({exc})") from None
    try:
        cfg = config_lib.from_dict(raw, source=str(config_path))
    except RunError as exc:
        raise ExportError(f"{exc} (the export rebuilds the run's model from its {layout.CONFIG})") from None
    return cfg, manifest


def check_step(step: str | int) -> str:
    """'latest', 'best' or a step number as a string; ExportError for anything else."""
    step = str(step).strip()
    if step in (LATEST, BEST) or step.isdigit():
        return step
    raise ExportError(f"--step: expected a step number, 'best' or 'latest', got {step!r}")


def resolve_checkpoint(run_dir: str | Path, step: str | int = "latest") -> str:
    """The checkpoint tag (`step_<N>`) that `--step` names, verified complete against its checkpoint.json."""
    directory = Path(run_dir) / layout.CHECKPOINTS
    checkpointer = Checkpointer(directory, rank=0)
    available = ", ".join(map(str, checkpointer.steps_on_disk())) or "none"
    step = check_step(step)
    if step == LATEST:
        found = checkpointer.find_latest()  # skips (with a warning) a damaged newest one
        if found is None:
            raise ExportError(f"{run_dir}: no complete checkpoint in {directory} (steps on disk: {available})")
        return found[0]
    if step == BEST:
        tag, problem = checkpointer.pointer(BEST)
        if problem:
            raise ExportError(f"--step best: {problem}; refusing to load it (use --step latest or a step number)")
        if tag is None:
            raise ExportError(f"{run_dir}: no best checkpoint ({directory / BEST} does not exist: the run did not "
                              "track eval.best_metric, or has not evaluated yet); use --step latest or a step number")
    else:
        tag = tag_for(int(step))
    path = directory / tag
    if not path.is_dir() and not path.is_symlink():
        raise ExportError(f"{run_dir}: no checkpoint {tag} (steps on disk: {available})")
    problem = verify(path)
    if problem is not None:
        raise ExportError(f"{path}: refusing this checkpoint, it is incomplete, damaged or not the run's own: "
                          f"{problem}")
    return tag


# ------------------------------------------------------------------------------------------------ weights


@dataclass
class Gathered:
    state_dict: dict
    source: dict = field(default_factory=dict)  # name -> "fp32_master" | "module" | "frozen_stored" | "base_model"
    zero_stage: int | None = None


def _quiet():
    """Silence zero_to_fp32's prints and progress bars (it reports on stdout and stderr)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _zero_masters(checkpoints: Path, tag: str) -> tuple[dict, int]:
    """ZeRO-1/2/3: (fp32 state dict from DeepSpeed's zero_to_fp32, stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    optim = sorted((checkpoints / tag).glob("*_optim_states.pt"))
    stage = torch.load(optim[0], map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    stage = int(stage.get("zero_stage", -1))
    try:
        with _quiet():
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ExportError(f"{checkpoints / tag}: DeepSpeed cannot gather its ZeRO partitions ({exc})") from None
    return dict(state), stage


def _zero0_masters(module_states: dict, model: torch.nn.Module, cfg) -> dict:
    """ZeRO-0: the fp32 copies of the trainable parameters kept by DeepSpeed's bf16/fp16 optimizer, named by the
    optimizer's parameter order (train.model.param_groups); {} for an fp32 run, whose module weights are the
    masters."""
    from train.model import param_groups

    optimizer = module_states.get("optimizer") or {}
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if groups is None and isinstance(optimizer, dict) and "fp32_groups_flat" in optimizer:
        groups = optimizer["fp32_groups_flat"]
    if groups is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    ours = param_groups(model, cfg.optim.weight_decay)
    if len(ours) != len(groups):
        raise ExportError(f"the checkpoint's optimizer has {len(groups)} parameter groups, the rebuilt model "
                          f"{len(ours)}; it was not written by this version of the trainer")
    out = {}
    for group, saved in zip(ours, groups):
        params = group["params"]
        if isinstance(saved, torch.Tensor):  # fp32_groups_flat: one flat tensor per group
            sizes = [p.numel() for p in params]
            if saved.numel() < sum(sizes):
                raise ExportError("the checkpoint's flat fp32 optimizer group is smaller than the rebuilt model's")
            saved = [t.view(p.shape) for t, p in zip(saved[:sum(sizes)].split(sizes), params)]
        if len(saved) != len(params):
            raise ExportError(f"the checkpoint's fp32 optimizer group has {len(saved)} tensors, the rebuilt model "
                              f"{len(params)}; it was not written by this version of the trainer")
        for param, tensor in zip(params, saved):
            if tuple(tensor.shape) != tuple(param.shape):
                raise ExportError(f"{names[id(param)][0]}: fp32 optimizer copy has shape {tuple(tensor.shape)}, "
                                  f"the model {tuple(param.shape)}")
            for name in names[id(param)]:
                out[name] = tensor.float()
    return out


def gather_state_dict(checkpoints: Path, tag: str, model: torch.nn.Module, cfg) -> Gathered:
    """The full state dict of checkpoint `tag` for `model` (built by build_model for the run), fp32 masters where
    they exist. See the module docstring for where each tensor comes from."""
    ckpt = checkpoints / tag
    module_file = ckpt / "mp_rank_00_model_states.pt"
    module_states = torch.load(module_file, map_location="cpu", weights_only=False) if module_file.is_file() else {}
    module = {k: v for k, v in (module_states.get("module") or {}).items() if isinstance(v, torch.Tensor)}
    expected = model.state_dict()
    if any(ckpt.glob("*_optim_states.pt")):
        masters, stage = _zero_masters(checkpoints, tag)
    elif module:
        masters, stage = _zero0_masters(module_states, model, cfg), 0
    else:
        raise ExportError(f"{ckpt}: neither ZeRO optimizer partitions (*_optim_states.pt) nor "
                          "mp_rank_00_model_states.pt; not a DeepSpeed checkpoint of this trainer")

    params = dict(model.named_parameters(remove_duplicate=False))
    trainable = {n for n, p in params.items() if p.requires_grad}

    def kind(name: str) -> str:
        return "fp32_master" if name in trainable else "frozen_stored" if name in params else "buffer"

    gathered = Gathered({}, {}, stage)
    for name, tensor in masters.items():
        stored = module.get(name)
        full = stored is not None and tuple(stored.shape) == tuple(tensor.shape)
        gathered.source[name] = kind(name)
        if tensor.dtype not in LOW_PRECISION:  # low precision: a frozen parameter, stored as it was trained
            if full and stored.is_floating_point() and not torch.equal(tensor.to(stored.dtype), stored):
                diff = (tensor.to(stored.dtype).float() - stored.float()).abs().max().item()
                raise ExportError(f"{ckpt}: the gathered fp32 weight {name} does not match the checkpoint's module "
                                  f"weight (max difference {diff:.3g} after casting to {stored.dtype}); refusing to "
                                  "export a possibly mis-assembled model")
        gathered.state_dict[name] = tensor
    for name, ref in expected.items():  # ZeRO-1 frozen parameters, ZeRO-0 everything but the fp32 copies
        if name not in gathered.state_dict and name in module and module[name].shape == ref.shape:
            gathered.state_dict[name] = module[name]
            gathered.source[name] = "module" if kind(name) == "fp32_master" else kind(name)
    missing = [n for n in expected if n not in gathered.state_dict]
    unexpected = [n for n in gathered.state_dict if n not in expected]
    if missing or unexpected:
        def some(what: str, names: list[str]) -> str:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            return f"{what} {len(names)}: {', '.join(names[:5])}{more}" if names else ""
        raise ExportError(f"{ckpt} does not fit the model rebuilt from the run's {layout.CONFIG}: "
                          + "; ".join(filter(None, [some("missing", missing), some("unexpected", unexpected)])))
    for name, ref in expected.items():
        tensor = gathered.state_dict[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ExportError(f"{ckpt}: {name} has shape {tuple(tensor.shape)}, the rebuilt model "
                              f"{tuple(ref.shape)}")
        # Never-updated weights: the base model's fp32 value rather than its bf16/fp16 rounding.
        if (cfg.model.init == "pretrained" and name not in trainable and tensor.dtype in LOW_PRECISION
                and ref.is_floating_point() and torch.equal(ref.to(tensor.dtype), tensor)):
            gathered.state_dict[name] = ref.detach().clone()
            gathered.source[name] = "base_model"
    return gathered


@dataclass
class TrainedModel:
    model: torch.nn.Module  # build_model's module (a PeftModel for LoRA) holding the checkpoint's weights, eval mode
    cfg: object
    manifest: dict
    run_dir: Path
    tag: str
    gathered: Gathered

    @property
    def step(self) -> int:
        return int(self.tag.split("_")[1])


def load_trained_model(run_dir: str | Path, step: str | int = "latest") -> TrainedModel:
    """Rebuild the run's model (train.model.build_model, on CPU, no DeepSpeed) and load checkpoint `step` into it."""
    from train.model import build_model

    run_dir = Path(run_dir)
    cfg, manifest = load_run(run_dir)
    tag = resolve_checkpoint(run_dir, step)
    cfg.model.activation_checkpointing = False  # inference only; the parameters are the same
    torch.manual_seed(cfg.run.seed)
    try:
        model = build_model(cfg, manifest)
    except RunError as exc:
        raise ExportError(f"rebuilding the run's model: {exc}") from None
    gathered = gather_state_dict(run_dir / layout.CHECKPOINTS, tag, model, cfg)
    model.load_state_dict(gathered.state_dict, strict=True)
    model.eval()
    return TrainedModel(model, cfg, manifest, run_dir, tag, gathered)


# ------------------------------------------------------------------------------------------------ writing


def _tokenizer_dir(manifest: dict) -> Path:
    from data_prep.manifest import tokenizer_files, tokenizer_fingerprint

    info = manifest["tokenizer"]
    path = Path(info["path"])
    if not path.is_dir() or not tokenizer_files(path):  # tokenizer.json, or a slow format (vocab.json + merges.txt...)
        raise ExportError(f"the run's tokenizer {path} ({layout.DATA_MANIFEST} tokenizer.path) is gone; an export "
                          "without the tokenizer the shards were made with would be unusable. Restore that directory")
    if info.get("fingerprint") and tokenizer_fingerprint(path) != info["fingerprint"]:
        raise ExportError(f"the run's tokenizer {path} changed since the shards were made (its fingerprint differs "
                          f"from {layout.DATA_MANIFEST}'s); restore the original tokenizer files")
    return path


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    from train.model import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        # A slow-format tokenizer (vocab.json + merges.txt, tokenizer.model): also write the fast tokenizer data_prep
        # converted it to. Without it transformers picks the tokenizer class from config.json's model type, which
        # for some (a Mistral with only tokenizer.model) is a generic class that encodes differently.
        from data_prep.backend import load_tokenizer

        load_tokenizer(source).save(str(target / "tokenizer.json"))
        copied.append("tokenizer.json")
    return copied


def _describe_files(directory: Path) -> str:
    lines = []
    for path in sorted(directory.iterdir()):
        size = path.stat().st_size
        shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB" if size >= 1024 \
            else f"{size} B"
        lines.append(f"  {path.name:<28} {shown:>10}")
    return "\n".join(lines)


def export_info(trained: TrainedModel, fmt: str) -> dict:
    from train.model import pad_id

    cfg, manifest = trained.cfg, trained.manifest
    sources: dict[str, int] = {}
    for src in trained.gathered.source.values():
        sources[src] = sources.get(src, 0) + 1
    info = {
        "format": fmt,  # "full" | "lora_merged" | "lora_adapter"
        "task": cfg.task.kind,
        "run_dir": str(trained.run_dir.resolve()),
        "checkpoint": trained.tag,
        "step": trained.step,
        "config_fingerprint": cfg.fingerprint(),
        "finetune_method": cfg.finetune.method,
        "model_init": cfg.model.init,
        "base_model": str(Path(cfg.model.path).resolve()) if cfg.model.init == "pretrained" else None,
        "precision": cfg.train.precision,
        "zero_stage": trained.gathered.zero_stage,
        "weight_sources": sources,
        "seq_len": cfg.data.seq_len,
        "tokenizer_fingerprint": manifest["tokenizer"].get("fingerprint"),
        "eos_id": manifest["tokenizer"]["eos_id"],
        "pad_id": pad_id(manifest),
        "record": (manifest.get("prep") or {}).get("record"),
    }
    if cfg.task.kind == "classification":
        info["labels"] = [str(label) for label in manifest["classification"]["labels"]]
    return info


def _load_hint(kind: str, output: Path, info: dict) -> str:
    auto = "AutoModelForSequenceClassification" if kind == "classification" else "AutoModelForCausalLM"
    if info["format"] != "lora_adapter":
        return (f"load it with: from transformers import {auto}; model = {auto}.from_pretrained({str(output)!r})\n"
                f"predict with: python -m train.predict {output} --input IN.jsonl --output OUT.jsonl")
    peft = "AutoPeftModelForSequenceClassification" if kind == "classification" else "AutoPeftModelForCausalLM"
    labels = ""
    if kind == "classification":
        id2label = {i: label for i, label in enumerate(info["labels"])}
        labels = f", num_labels={len(id2label)}, id2label={id2label!r}"
    return (f"a LoRA adapter over the base model {info['base_model']}; load it with:\n"
            f"  from peft import {peft}; model = {peft}.from_pretrained({str(output)!r}{labels})\n"
            f"(or export without --no-merge for a standalone model that plain {auto}.from_pretrained loads)")


def is_export(directory: Path) -> bool:
    """Whether `directory` is a real directory written by train.export (holds our export.json)."""
    info = directory / EXPORT_INFO
    if directory.is_symlink() or not directory.is_dir() or info.is_symlink() or not info.is_file():
        return False
    try:
        data = json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and {"format", "run_dir", "checkpoint"} <= data.keys()


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output(output: Path, overwrite: bool, run_dir: Path | None = None, protected: dict | None = None) -> Path:
    """The absolute --output path, if writing there is allowed; ExportError (one line) otherwise. `protected`:
    {description: path} of directories --overwrite must never replace (the run's base model, tokenizer)."""
    shown = output
    output = Path(os.path.abspath(output))
    real, cwd = output.resolve(), Path.cwd().resolve()
    if _inside(cwd, real):
        where = "the current directory" if real == cwd else "a parent of the current directory"
        raise ExportError(f"--output {shown} is {where}; give a new directory to write the model to, e.g. "
                          "--output models/<name>")
    if not (output.exists() or output.is_symlink()):
        return output
    if not overwrite:
        if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
            return output  # an empty directory is filled
        raise ExportError(f"--output {shown} exists; choose a new directory or pass --overwrite (which replaces "
                          "only an earlier export)")
    if output.is_symlink():
        raise ExportError(f"--output {shown} is a symbolic link; --overwrite replaces only a directory written by "
                          "train.export")
    if run_dir is not None and _inside(Path(run_dir).resolve(), real):
        what = "the run directory" if real == Path(run_dir).resolve() else "a directory holding the run directory"
        raise ExportError(f"--output {shown} is {what} {run_dir}; --overwrite never replaces it")
    for what, path in (protected or {}).items():
        if path is not None and _inside(Path(path).resolve(), real):
            raise ExportError(f"--output {shown} holds {what} {path}; --overwrite never replaces it")
    if output.is_dir() and not any(output.iterdir()):
        return output
    if not is_export(output):
        raise ExportError(f"--output {shown} is not an earlier export (no {EXPORT_INFO} written by train.export); "
                          "--overwrite replaces only those. Choose a new directory")
    return output


def export_model(run_dir: str | Path, output: str | Path, step: str | int = "latest", merge: bool = True,
                 overwrite: bool = False, log=print) -> Path:
    """Export checkpoint `step` of `run_dir` to the HF model dir `output`; returns `output`."""
    check_step(step)
    cfg, manifest = load_run(run_dir)
    output = check_output(Path(output), overwrite, run_dir, {
        "the run's base model (model.path)": cfg.model.path if cfg.model.init == "pretrained" else None,
        "the run's tokenizer": manifest.get("tokenizer", {}).get("path")})
    lora = cfg.finetune.method == "lora"
    if not merge and not lora:
        raise ExportError(f"--no-merge keeps a LoRA adapter, but {run_dir} trained with finetune.method="
                          f"{cfg.finetune.method}; drop --no-merge")
    if not merge and cfg.model.init != "pretrained":
        raise ExportError("--no-merge: this LoRA run's base model was built from scratch and exists only in the "
                          "checkpoint, so an adapter alone could not be loaded; export merged (drop --no-merge)")
    tokenizer_dir = _tokenizer_dir(manifest)
    trained = load_trained_model(run_dir, step)
    fmt = "lora_adapter" if not merge else "lora_merged" if lora else "full"
    info = export_info(trained, fmt)

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output) as tmp:  # replaces an earlier export only once this one is complete
        model = trained.model
        if fmt == "lora_adapter":
            model.peft_config["default"].base_model_name_or_path = info["base_model"]
            model.save_pretrained(tmp)
            (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        else:
            if lora:
                model = model.merge_and_unload()
            model.config.use_cache = True  # training turns the KV cache off; generation wants it
            model.save_pretrained(tmp)
        _copy_tokenizer(tokenizer_dir, tmp)
        info[CHECKSUM] = {path.name: file_checksum(path) for path in sorted(tmp.iterdir()) if path.is_file()}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    what = {"full": "model", "lora_merged": "model (LoRA merged into the base weights)",
            "lora_adapter": "LoRA adapter"}[fmt]
    log(f"exported {trained.tag} of {run_dir} ({cfg.task.kind}, {what}, fp32, ZeRO-{trained.gathered.zero_stage} "
        f"{cfg.train.precision} checkpoint) to {output}:\n{_describe_files(output)}\n"
        f"{_load_hint(cfg.task.kind, output, info)}")
    return output


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description="Export a run's checkpoint as a HuggingFace model directory.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, <run.output_dir>/<run.name>")
    parser.add_argument("--step", default="latest",
                        help="checkpoint to export: a step number, 'best' (eval.best_metric) or 'latest' (default)")
    parser.add_argument("--output", required=True, help="directory to write (must not exist, see --overwrite)")
    parser.add_argument("--no-merge", action="store_true",
                        help="LoRA runs: write the PEFT adapter instead of merging it into the base weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it is an earlier export (a directory holding export.json)")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    """Keep a CLI's output to what it did: transformers' load reports (a new head is 'MISSING' from the base
    model, as expected), progress bars and PEFT's notices say nothing the user must act on."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_prep.errors import DataError

    quiet_libraries()

    try:
        export_model(args.run_dir, args.output, step=args.step, merge=not args.no_merge, overwrite=args.overwrite)
    except (RunError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exit_codes.USAGE
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
