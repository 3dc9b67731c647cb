"""Run config hardening: duplicate YAML keys, configs that are not a mapping or not UTF-8, YAML syntax errors in
overrides, empty values, and range checks on every value; each is one `error:` line from train/main.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from train import config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(path, list(overrides))
    return str(err.value)


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


@pytest.mark.parametrize("text, overrides, message", [
    ("data: {path: shards}\ntrain: {max_steps: 3}\ntrain: {log_every: 1}\n", [],
     "duplicate key 'train' at lines 2 and 3"),
    ("- data\n", [], "must be a YAML mapping of sections"),
    ("data: {path: shards}\n", ["train.max_steps=["], "override 'train.max_steps=[': the value is not valid YAML"),
    ("data: {path: shards}\n", ["optim.betas=[a, b]"], "optim.betas: must be two numbers in [0, 1), got ['a', 'b']"),
])
def test_main_prints_one_error_line_and_exits_2(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    proc = subprocess.run([sys.executable, "train/main.py", "--config", str(path), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
