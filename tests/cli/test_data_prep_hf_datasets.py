"""`python -m data_prep tokenize --input hf:...` as its own process: a dataset put in the local datasets cache by
`load_dataset` (in a process with that cache's environment) read offline, through HF_HOME or HF_DATASETS_CACHE; every
bad hf: input is exactly one `error:` line on stderr, exit status 2 and nothing written; and a fresh interpreter
reading hf: inputs imports neither torch nor datasets. In this process: tests/unit/test_data_prep_hf_datasets.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Value

from data_prep.pipeline import tokenize_corpus
from data_prep.records import RecordSpec
from data_prep.shards import ShardSet
from tests.conftest import (ROOT, docs_of, random_text, random_texts, reference_ids, run_data_prep, shard_hashes,
                            write_jsonl)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_cache_entry_made_by_load_dataset_is_read_offline(tiny, tmp_path):
    source = tmp_path / "reviews"  # a local dataset: one jsonl file per split
    source.mkdir()
    rng = random.Random(9)
    records = {s: [{"text": random_text(rng), "label": rng.choice(["bad", "good"])} for _ in range(n)]
               for s, n in (("train", 30), ("validation", 6), ("test", 5))}
    for split, rows in records.items():
        write_jsonl(source / f"{split}.jsonl", rows)
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env = {**{k: v for k, v in os.environ.items() if k != "HF_DATASETS_CACHE"}, **env}
    subprocess.run([sys.executable, "-c", f"import datasets; datasets.load_dataset({str(source)!r})"], env=env,
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "hf_home/datasets/reviews/default").is_dir()
    out = tmp_path / "out"
    proc = run_data_prep("tokenize", "--input", "hf:reviews", "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(out), "--record-kind", "classification", "--splits-from-input", env=env)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_splits"] == {"train": ["hf:reviews:default['train']"],
                                        "val": ["hf:reviews:default['validation']"],
                                        "test": ["hf:reviews:default['test']"]}
    assert manifest["classification"]["labels"] == ["bad", "good"]  # string labels: sorted, as for jsonl
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        same = tokenize_corpus([str(source / f"{theirs}.jsonl")], tiny["tokenizer"], tmp_path / f"ref_{theirs}",
                               spec=RecordSpec(kind="classification", labels=("bad", "good")))
        assert shard_hashes(same)["train"] == shard_hashes(manifest)[ours]
    # The same cache through HF_DATASETS_CACHE; a dataset that is not there is one error saying how to get it.
    env2 = {**env, "HF_HOME": str(tmp_path / "elsewhere"), "HF_DATASETS_CACHE": str(tmp_path / "hf_home/datasets")}
    proc = run_data_prep("tokenize", "--input", "hf:reviews", "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(tmp_path / "out2"), "--hf-split", "test", env=env2)
    assert proc.returncode == 0, proc.stderr
    assert docs_of(ShardSet(tmp_path / "out2")) == [ids + [0] for ids in reference_ids(
        tiny["hf"], [r["text"] for r in records["test"]])]
    proc = run_data_prep("tokenize", "--input", "hf:someone/imdb", "--tokenizer", str(tiny["tokenizer"]), "--output",
                         str(tmp_path / "out3"), env=env)
    assert proc.returncode == 2 and not (tmp_path / "out3").exists()
    assert proc.stderr.splitlines() == [
        f"error: hf:someone/imdb: not in the local datasets cache ({tmp_path / 'hf_home/datasets'}; set by "
        "HF_DATASETS_CACHE or HF_HOME). data_prep reads offline: download it first with `python -c \"import "
        "datasets; datasets.load_dataset('someone/imdb')\"` (with network access and the same cache), or save it "
        "with save_to_disk and pass hf:DIR"]


def bad_inputs(tmp_path: Path) -> dict:
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "x.jsonl", [{"text": "alpha"}])
    DatasetDict({"train": Dataset.from_dict({"text": ["alpha"], "n": [1]}),
                 "validation": Dataset.from_dict({"text": [], "n": []},
                                                 features=Features({"text": Value("string"), "n": Value("int64")}))
                 }).save_to_disk(str(tmp_path / "dd"))
    return {"plain": tmp_path / "plain", "dd": tmp_path / "dd"}


@pytest.mark.parametrize("case", ["not_saved", "a_file", "no_split", "wrong_type", "empty_split", "no_column",
                                  "empty_chosen", "both_splits"])
def test_bad_input_is_one_line_and_nothing_is_written(tiny, tmp_path, case):
    paths = bad_inputs(tmp_path)
    plain, dd = paths["plain"], paths["dd"]
    args, error = {
        "not_saved": ([f"hf:{plain}"], f"hf:{plain}: not a dataset saved with save_to_disk (it has no "
                      f"dataset_dict.json or state.json); pass the directory save_to_disk wrote, data files directly "
                      f"(--input {plain} reads its .jsonl/.parquet/.csv/.txt files), or hf:NAME for a dataset in the "
                      "datasets cache"),
        "no_split": ([f"hf:{dd}", "--hf-split", "test"], f"hf:{dd} has no split 'test' (splits: 'train', "
                     "'validation'); pass --hf-split with one of them"),
        "wrong_type": ([f"hf:{dd}", "--text-field", "n"], f"{dd}['train']: column 'n' holds int64, not text (a string "
                       "column); pass --text-field with the column that holds the text (columns: 'text', 'n')"),
        "empty_split": ([f"hf:{dd}", "--splits-from-input"], f"{dd}['validation'] is empty (0 rows); pass "
                        "--hf-split with a split that holds rows"),
        "no_column": ([f"hf:{dd}", "--record-kind", "classification"], f"{dd}['train']: no column 'label' (columns: "
                      "'text', 'n'); pass --label-field with the column that holds it"),
        "a_file": ([f"hf:{plain / 'x.jsonl'}"], f"hf:{plain / 'x.jsonl'}: {plain / 'x.jsonl'} is a file; hf: takes a "
                   "directory written by save_to_disk or the name of a dataset in the datasets cache (pass data files "
                   "without hf:)"),
        "empty_chosen": ([f"hf:{dd}", "--hf-split", "validation"], f"{dd}['validation'] is empty (0 rows); pass "
                     "--hf-split with a split that holds rows"),
        "both_splits": ([f"hf:{dd}", "--splits-from-input", "--val-count", "1"], "--splits-from-input takes val and "
                        "test from the dataset's own splits; drop --val-fraction, --val-count, --test-fraction and "
                        "--test-count"),
    }[case]
    out = tmp_path / "out"
    proc = run_data_prep("tokenize", "--input", *args, "--tokenizer", str(tiny["tokenizer"]), "--output", str(out))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {error}"]
    assert not out.exists()


def test_hf_input_imports_neither_torch_nor_datasets(tiny, tmp_path):
    Dataset.from_dict({"text": random_texts(20)}).save_to_disk(str(tmp_path / "ds"))
    code = (f"import sys; from data_prep.__main__ import main; main(['tokenize', '--input', 'hf:{tmp_path / 'ds'}', "
            f"'--tokenizer', '{tiny['tokenizer']}', '--output', '{tmp_path / 'out'}', '--workers', '2']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'deepspeed', "
            "'datasets'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
