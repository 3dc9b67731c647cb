"""train.resume: whether a run may continue from a checkpoint whose config differs from its own: changes that alter
the model or its data (the fields declared BREAKING in train.config, and the tokenizer) are refused with every
difference named; the others are reported."""

from __future__ import annotations

import pytest

from train import config, resume
from train.errors import ResumeError


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
    # A checkpoint written before a key existed ran with its default: resuming with the default is no change, with
    # another value of a breaking key it is refused.
    older = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "length_grouping"}}
    assert resume.check_compatible(older, saved, tmp_path) == []
    grouped = config.from_dict({"task": {"kind": "sft"}, "data": {"path": "x", "length_grouping": 64}}).to_dict()
    with pytest.raises(ResumeError, match="data.length_grouping: 0 -> 64"):
        resume.check_compatible({**older, "task": grouped["task"]}, {**grouped, resume.TOKENIZER_KEY: "abc"},
                                tmp_path)
