"""train.config: loading YAML plus dotted overrides, and the one-line errors for whatever a user can get wrong in a
config (unknown keys with the nearest valid one, duplicate keys, not a mapping, not UTF-8, YAML syntax, out-of-range
values, fine-tuning settings that do not fit together); the keys moved out of `train`; the per-field resume policy;
every shipped recipe parses; and a property-based check that any bytes and overrides give a Config that survives the
run directory's config.yaml, or one ConfigError line."""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import ROOT, fuzz_settings
from train import config, ds_config, precision
from train.errors import ConfigError


def write(tmp_path, text, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(path, list(overrides))
    return str(err.value)


# ------------------------------------------------------------------------------------------------------------- loading


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


# -------------------------------------------------------------------------------------------------------------- errors


def test_duplicate_key_in_a_section_names_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain:\n  max_steps: 3\n  log_every: 1\n  max_steps: 5\n")
    assert error_of(path) == (f"{path}: duplicate key 'train.max_steps' at lines 3 and 5; keep one (YAML would "
                              "silently use the last)")


def test_duplicate_section_names_it_and_both_lines(tmp_path):
    path = write(tmp_path, "train: {max_steps: 3}\ndata: {path: shards}\n\ntrain:\n  log_every: 1\n")
    assert error_of(path) == (f"{path}: duplicate key 'train' at lines 1 and 4; keep one (YAML would silently use "
                              "the last)")


def test_duplicate_key_nested_and_in_an_override_value(tmp_path):
    path = write(tmp_path, "data: {path: shards}\nmodel:\n  hf_config:\n    n_layer: 2\n    n_layer: 3\n")
    assert error_of(path).startswith(f"{path}: duplicate key 'model.hf_config.n_layer' at lines 4 and 5;")
    ok = write(tmp_path, "data: {path: shards}\n", "ok.yaml")
    assert error_of(ok, ["model.hf_config={n_layer: 2, n_layer: 3}"]) == (
        "override 'model.hf_config={n_layer: 2, n_layer: 3}': duplicate key 'n_layer' in the value; keep one")


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    path = write(tmp_path, "data: {path: shards}\nmodel:\n  hf_config:\n    base: &b {n_layer: 2, n_head: 2}\n"
                           "optim: {betas: [0.9, 0.95]}\n")
    assert config.load(path).model.hf_config["base"] == {"n_layer": 2, "n_head": 2}
    assert config._yaml_load("a: &x {k: 1, j: 2}\nb: {<<: *x, k: 3}\n") == {"a": {"k": 1, "j": 2},
                                                                          "b": {"k": 3, "j": 2}}


@pytest.mark.parametrize("text, what", [("- a\n- b\n", "list"), ("just a string\n", "string"), ("42\n", "number")])
def test_config_that_is_not_a_mapping_is_one_line(tmp_path, text, what):
    path = write(tmp_path, text)
    assert error_of(path) == (f"{path}: must be a YAML mapping of sections (run, task, model, finetune, data, optim, "
                              f"train, eval, checkpoint), got a {what}")


def test_config_not_utf8_names_the_byte_and_line(tmp_path):
    path = write(tmp_path, b"data: {path: shards}\nrun: {name: caf\xe9}\n")
    assert error_of(path) == f"{path}: not UTF-8 text (byte 0xe9 at line 2); save the config as UTF-8"


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain: [\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML (") and "line 3, column 1" in message and "\n" not in message
    ok = write(tmp_path, "data: {path: shards}\n", "ok.yaml")
    assert error_of(ok, ["train.max_steps=["]) == (
        "override 'train.max_steps=[': the value is not valid YAML (expected the node content, but found '<stream "
        "end>' at column 2, while parsing a flow node); quote a value that holds YAML syntax, e.g. "
        "'run.name=\"[x]\"'")
    assert error_of(ok, ["train..max_steps=3"]).startswith("override 'train..max_steps=3': expected section.key=value")


def test_empty_value_is_an_empty_string_for_string_fields(tmp_path):
    path = write(tmp_path, "data: {path: shards}\ntrain:\n")
    cfg = config.load(path, ["data.val_split=", "data.test_split=", "train.max_steps=7"])
    assert (cfg.data.val_split, cfg.data.test_split, cfg.train.max_steps) == ("", "", 7)
    assert error_of(path, ["data.path="]).startswith("data.path: is required")
    assert error_of(path, ["data.train_split="]) == ("data.train_split: must not be empty (the manifest split to train "
                                                     "on)")
    assert config.load(write(tmp_path, "data: {path: shards, val_split: }\n", "e.yaml")).data.val_split == ""


@pytest.mark.parametrize("override, message", [
    ("run.seed=-1", "run.seed: must be in [0, 2**63), got -1"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ("optim.eps=.nan", "optim.eps: must be > 0, got nan"),
    ("optim.betas=[a, b]", "optim.betas: must be two numbers in [0, 1), got ['a', 'b']"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[0.9, true]", "optim.betas: must be two numbers in [0, 1), got [0.9, True]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
    ("optim.lr=.inf", "optim.lr: must be > 0, got inf"),
    ("optim.lr=1e999", "optim.lr: must be > 0, got inf"),
    ("optim.grad_clip=.nan", "optim.grad_clip: must be >= 0, got nan"),
    ("data.length_grouping=-1", "data.length_grouping: must be >= 0, got -1"),
    ("finetune.lora_alpha=0", "finetune.lora_alpha: must be > 0, got 0.0"),
    ("finetune.lora_target_modules=[1]", "finetune.lora_target_modules: must be a list of module names, got [1]"),
    ("optim.lr=" + "9" * 400, "optim.lr must be float, got int 999"),
])
def test_every_value_is_range_checked(tmp_path, override, message):
    path = write(tmp_path, "data: {path: shards}\n")
    message_got = error_of(path, [override])
    assert message_got.startswith(message) or message_got.startswith(f"{path}: {message}"), message_got


def test_non_string_keys_are_unknown_keys_not_crashes(tmp_path):
    assert error_of(write(tmp_path, "data: {path: shards}\n1: x\n")).endswith(
        "unknown key '1'; valid keys: checkpoint, data, eval, finetune, model, optim, run, task, train")
    assert "unknown key 'train.None'" in error_of(write(tmp_path, "data: {path: shards}\ntrain: {~: 1}\n", "n.yaml"))
    assert error_of(write(tmp_path, "data: {path: shards}\ntrain: 0\n", "z.yaml")).endswith(
        "section 'train' must be a mapping, got int")


@pytest.mark.parametrize("raw,message", [
    ({"task": {"kind": "translation"}}, "task.kind: must be one of causal_lm, sft, classification"),
    ({"finetune": {"method": "freeze"}}, "finetune.method: is freeze but nothing is frozen"),
    ({"finetune": {"freeze_bottom_layers": 2}}, "finetune.method: is full; the freeze_* keys need method: freeze"),
    ({"model": {"init": "pretrained"}}, "model.path: is required with model.init: pretrained"),
    ({"eval": {"early_stopping_patience": 2}}, "eval.early_stopping_patience: needs eval.best_metric"),
    ({"eval": {"best_metric": "accuracy"}}, "eval.best_metric: must be a validation metric (val/...)"),
    ({"eval": {"best_metric": "val/loss"}, "data": {"path": "x", "val_split": ""}},
     "eval.best_metric: needs a validation split (data.val_split) to measure it on"),
    ({"model": {"dropout": 1.5}}, "model.dropout: must be null or in [0, 1), got 1.5"),
    ({"data": {"path": "x", "length_grouping": 64}}, "data.length_grouping: groups sft and classification examples; "
                                                     "causal_lm windows all hold data.seq_len tokens (set 0)"),
])
def test_finetune_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"data": {"path": "x"}, **raw})
    assert message in str(err.value)


# ---------------------------------------------------------------------------------- recipes, moved keys, resume policy


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_runs_on_any_hardware(recipe):
    cfg = config.load(recipe)
    assert cfg.train.precision == "auto"  # no recipe hard-codes a precision some hardware lacks
    resolved = precision.resolve(cfg.train.precision, torch.device("cpu")).precision
    ds = ds_config.build(precision.with_precision(cfg, resolved), world_size=2)
    assert ds["bf16"]["enabled"] == (resolved == "bf16") and ds["fp16"]["enabled"] is False


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


def test_describe_documents_every_key():
    text = config.describe()
    for key in ("max_steps", "deepspeed_config", "seq_len", "warmup_steps", "resume", "hf_config"):
        assert f"  {key} (default" in text


# ----------------------------------------------------------------------------------------------------------- any input


KEYS = config._all_keys()
yaml_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                        st.text(max_size=10), st.lists(st.one_of(st.floats(), st.text(max_size=3)), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
override_text = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["train", "x.y", "train.max_step", "run.name.x"]),
              st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                        st.text(alphabet=string.printable, max_size=10))),
    st.text(max_size=20))


@fuzz_settings
@given(sections=st.dictionaries(st.sampled_from(KEYS + ["train", "bogus.key"]), yaml_values, max_size=6),
       raw_text=st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=40)),
       overrides=st.lists(override_text, max_size=3))
@example(sections={}, raw_text="train: {max_steps: 1}\ntrain: {max_steps: 2}\n", overrides=[])
@example(sections={}, raw_text="a: &a [*a]\n", overrides=[])
@example(sections={}, raw_text=None, overrides=["optim.betas=[a, b]", "train.max_steps=["])
def test_config_loader_gives_a_config_or_one_line_config_error(scratch, sections, raw_text, overrides):
    path = scratch / "fuzz.yaml"
    if raw_text is None:
        nested: dict = {"data": {"path": "shards"}}
        for dotted, value in sections.items():
            section, _, key = dotted.partition(".")
            node = nested.setdefault(section, {})
            if key and isinstance(node, dict):
                node[key] = value
        path.write_text(yaml.safe_dump(nested))
    elif isinstance(raw_text, bytes):
        path.write_bytes(raw_text)
    else:
        path.write_text(raw_text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = config.load(path, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), repr(str(exc))
        return
    assert isinstance(cfg, config.Config)
    # The resolved config is what the trainer writes to the run's config.yaml and export/predict rebuild the run from:
    # it must read back as the same config.
    fingerprint = cfg.fingerprint()
    assert len(fingerprint) == 16 and set(fingerprint) <= set("0123456789abcdef")
    reloaded = config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)), source=str(path))
    assert reloaded.fingerprint() == fingerprint
