"""`python -m data_prep demo-corpus` (its main, in this process): sft and classification records made from the
definitions and docstrings of Python's standard library. The text corpus end to end as a command:
tests/cli/test_data_prep.py."""

from __future__ import annotations

import json

import pytest

from data_prep.__main__ import main

# demo-corpus parses the standard library's sources with `ast`; a few hold escapes Python warns about.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


def test_demo_corpus_sft_and_classification_records_come_from_stdlib_definitions(tmp_path):
    import ast
    import inspect
    import json as json_module

    for kind in ("sft", "classification"):
        assert main(["demo-corpus", "--kind", kind, "--output", str(tmp_path / f"{kind}.jsonl"), "--max-mb",
                     "0.05"]) == 0
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    cls = [json.loads(line) for line in (tmp_path / "classification.jsonl").read_text().splitlines()]
    assert min(len(sft), len(cls)) > 50 and all(set(r) == {"prompt", "response"} for r in sft)
    for record, example in zip(sft, cls):  # the same definitions in the same order
        assert record["prompt"] == f"Docstring: {example['text']}\nDefinition:"
        assert record["response"].startswith(" def " if example["label"] == "function" else " class ")
    assert {r["label"] for r in cls} == {"function", "class"}
    # A known stdlib definition appears exactly as Python reports it.
    doc = " ".join(inspect.getdoc(json_module.dumps).split("\n\n")[0].split())
    name = ast.parse(inspect.getsource(json_module.dumps)).body[0]
    full = tmp_path / "all.jsonl"
    assert main(["demo-corpus", "--kind", "sft", "--output", str(full), "--max-mb", "100"]) == 0
    records = [json.loads(line) for line in full.read_text().splitlines()]
    assert {"prompt": f"Docstring: {doc}\nDefinition:", "response": f" def dumps({ast.unparse(name.args)}):"} in records
