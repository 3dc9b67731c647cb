"""Run config: parsing, overrides, validation messages, and that every shipped recipe and preset parses."""

import dataclasses
from pathlib import Path

import pytest
import torch

from train import config, ds_config, precision, resume
from train.errors import ConfigError, ResumeError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_applies_overrides_and_defaults_name_to_file_stem(tmp_path):
    path = write(tmp_path, "data: {path: shards}\noptim: {lr: 1e-3}\ntrain: {max_steps: 10}\n")
    cfg = config.load(path, ["train.max_steps=25", "model.hf_config={n_layer: 3}", "optim.betas=[0.8, 0.9]"])
    assert cfg.run.name == "recipe"
    assert cfg.train.max_steps == 25
    assert cfg.optim.lr == 1e-3  # YAML reads 1e-3 as a string; numeric strings are accepted for floats
    assert cfg.model.hf_config == {"n_layer": 3}
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.run_dir == Path("runs/recipe")


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain: {max_step: 10}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: unknown key 'train.max_step'; did you mean 'train.max_steps'?"


def test_unknown_section_and_override_typo(tmp_path):
    path = write(tmp_path, "data: {path: shards}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'; did you mean 'optim'\?"):
        config.load(path, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"override 'train.max_steps': expected section.key=value"):
        config.load(path, ["train.max_steps"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "train.max_steps: must be >= 1, got 0"),
    ("train.precision=fp8", "train.precision: must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("optim.min_lr=1.0", "optim.min_lr: must be in [0, optim.lr], got 1.0"),
    ("run.resume=maybe", "run.resume: must be one of auto, never, require, got 'maybe'"),
    ("train.micro_batch_size=two", "train.micro_batch_size must be int, got str 'two'"),
    ("data.path=''", "data.path: is required"),
])
def test_invalid_values_are_rejected_with_the_key(tmp_path, override, message):
    path = write(tmp_path, "data: {path: shards}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, [override])
    assert message in str(err.value)


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


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_runs_on_any_hardware(recipe):
    cfg = config.load(recipe)
    assert cfg.train.precision == "auto"  # no recipe hard-codes a precision some hardware lacks
    resolved = precision.resolve(cfg.train.precision, torch.device("cpu")).precision
    ds = ds_config.build(precision.with_precision(cfg, resolved), world_size=2)
    assert ds["bf16"]["enabled"] == (resolved == "bf16") and ds["fp16"]["enabled"] is False


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


def test_keys_moved_out_of_train_are_still_read_under_their_old_names(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain: {eval_every: 7, save_every: 9, best_metric: val/loss}\n")
    cfg = config.load(path, ["train.keep_last=2", "eval.batches=3"])
    assert (cfg.eval.every, cfg.checkpoint.every, cfg.eval.best_metric, cfg.checkpoint.keep_last,
            cfg.eval.batches) == (7, 9, "val/loss", 2, 3)
    assert config.load(path, ["train.eval_every=5"]).eval.every == 5  # an override of the old name still wins
    both = write(tmp_path, "data: {path: shards}\ntrain: {eval_every: 7}\neval: {every: 3}\n", "both.yaml")
    with pytest.raises(ConfigError) as err:
        config.load(both)
    assert str(err.value) == (f"{both}: train.eval_every and eval.every are the same setting (train.eval_every is "
                              "its old name); keep eval.every")


def test_every_field_declares_whether_a_resume_may_change_it():
    fields = {f"{section}.{f.name}": f.metadata["on_resume"] for section, cls in config._SECTION_CLASSES.items()
              for f in dataclasses.fields(cls)}
    assert set(fields.values()) == {config.ALLOWED, config.BREAKING}
    assert {key for key, policy in fields.items() if policy == config.BREAKING} == config.breaking_keys()
    assert {"model.hf_config", "data.seq_len", "data.train_split", "train.precision", "run.seed"} <= \
        config.breaking_keys()
    assert not {"optim.lr", "train.max_steps", "eval.every", "checkpoint.every"} & config.breaking_keys()


def test_resume_refuses_breaking_changes_and_reports_the_others(tmp_path):
    saved = {**config.from_dict({"data": {"path": "x"}}).to_dict(), resume.TOKENIZER_KEY: "abc"}
    changed = config.from_dict({"data": {"path": "x"}, "optim": {"lr": 1e-3}, "eval": {"every": 5}}).to_dict()
    assert resume.check_compatible(saved, {**changed, resume.TOKENIZER_KEY: "abc"}, tmp_path) == [
        "eval.every: 100 -> 5", "optim.lr: 0.0003 -> 0.001"]
    for raw, change in (({"model": {"hf_config": {"n_layer": 3}}}, "model.hf_config.n_layer: None -> 3"),
                        ({"data": {"path": "x", "seq_len": 64}}, "data.seq_len: 512 -> 64")):
        current = config.from_dict({"data": {"path": "x"}, **raw}).to_dict()
        with pytest.raises(ResumeError, match="the run changed in ways that change the model or its data") as err:
            resume.check_compatible(saved, {**current, resume.TOKENIZER_KEY: "abc"}, tmp_path)
        assert change in str(err.value) and "optim" not in str(err.value)
    with pytest.raises(ResumeError, match="tokenizer_fingerprint: 'abc' -> 'def'"):
        resume.check_compatible(saved, {**saved, resume.TOKENIZER_KEY: "def"}, tmp_path)
    # A checkpoint written when eval.every was train.eval_every compares under the new name.
    old = {**saved, "train": {**saved["train"], "eval_every": 100}, "eval": {k: v for k, v in saved["eval"].items()
                                                                            if k != "every"}}
    assert resume.check_compatible(old, saved, tmp_path) == []


def test_describe_documents_every_key():
    text = config.describe()
    for key in ("max_steps", "deepspeed_config", "seq_len", "warmup_steps", "resume", "hf_config"):
        assert f"  {key} (default" in text


def test_hf_config_typo_is_rejected_with_nearest_key():
    from train.config import ModelConfig
    from train.model import build_hf_config

    tokenizer = {"vocab_size": 100, "eos_id": 0, "bos_id": None, "pad_id": None}
    with pytest.raises(ConfigError) as err:
        build_hf_config(ModelConfig(hf_config={"n_layers": 2}), tokenizer, seq_len=16)
    assert str(err.value) == "model.hf_config: 'n_layers' is not a gpt2 config key; did you mean 'n_layer'?"
    hf = build_hf_config(ModelConfig(hf_config={"n_layer": 2, "num_attention_heads": 4}), tokenizer, seq_len=16)
    assert (hf.n_layer, hf.n_head, hf.vocab_size, hf.bos_token_id) == (2, 4, 100, 0)
    with pytest.raises(ConfigError, match="data.seq_len=64 exceeds the model's 32 positions"):
        build_hf_config(ModelConfig(hf_config={"n_positions": 32}), tokenizer, seq_len=64)
