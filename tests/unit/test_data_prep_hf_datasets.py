"""data_prep.hf_datasets: Hugging Face `datasets` data read straight from its arrow files: save_to_disk directories
(Dataset, DatasetDict), their splits (train only, --hf-split, or --splits-from-input) and ClassLabel features, any
units and workers, array tasks and resume. Every dataset here is built with `datasets` itself, and every result is
compared with the same records given as jsonl. The datasets cache and one-line errors of the command:
tests/cli/test_data_prep_hf_datasets.py."""

from __future__ import annotations

import json
import random

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from data_prep.errors import DataError
from data_prep.pipeline import merge, tokenize_corpus
from data_prep.readers import expand_inputs, plan_units
from data_prep.records import RecordSpec
from data_prep.shards import ShardSet
from tests.conftest import (docs_of, masks_of, random_text, random_texts, reference_ids, shard_hashes,
                            with_chat_template, write_jsonl)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def labels_of(shards: ShardSet) -> list[int]:
    return [int(x) for i in range(shards.num_shards) for x in shards.labels(i)]


SENTIMENT = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})  # not sorted order


@pytest.fixture
def sentiment(tmp_path) -> dict:
    """A DatasetDict with train / validation / test and a ClassLabel, as the records it holds per split."""
    rng = random.Random(5)
    records = {split: [{"text": random_text(rng), "label": rng.randint(0, 1)} for _ in range(n)]
               for split, n in (("train", 50), ("validation", 12), ("test", 9))}
    DatasetDict({split: Dataset.from_list(rows, features=SENTIMENT) for split, rows in records.items()}
                ).save_to_disk(str(tmp_path / "sentiment"))
    return {"dir": tmp_path / "sentiment", "records": records}


# ------------------------------------------------------------------------------------------------------------- Dataset


def test_saved_dataset_gives_the_ids_of_the_same_records_as_jsonl_for_any_units_and_workers(tiny, tmp_path):
    docs = random_texts(2500)  # datasets writes record batches of 1000 rows: 3 batches per file
    Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    jsonl = write_jsonl(tmp_path / "same.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs)])
    reference = tokenize_corpus([jsonl], tiny["tokenizer"], tmp_path / "ref", val_count=40)
    files = expand_inputs([f"hf:{tmp_path / 'ds'}"])
    assert files == [str(tmp_path / "ds" / f"data-0000{i}-of-00002.arrow") for i in range(2)]
    assert len(plan_units(files, 20_000)) >= 4  # runs of record batches
    whole = tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "a", val_count=40)
    cut = tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "b", val_count=40,
                          chunk_mb=20_000 / 2**20, workers=2)
    assert shard_hashes(whole) == shard_hashes(cut) == shard_hashes(reference)
    assert whole["counts"] == cut["counts"] and whole["counts"]["docs_read"] == 2500
    assert whole["inputs"] == files
    train = docs_of(ShardSet(tmp_path / "a", "train")) + docs_of(ShardSet(tmp_path / "a", "val"))
    assert sorted(train) == sorted(ids + [0] for ids in reference_ids(tiny["hf"], docs))


def test_worker_processes_give_identical_shards(tiny, tmp_path, monkeypatch):
    docs = random_texts(2200, seed=4)
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    one = tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "one")
    monkeypatch.setenv("DATA_PREP_MIN_MB_PER_PROCESS", "0")  # 2 spawned processes, not threads
    two = tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "two", workers=2,
                          chunk_mb=30_000 / 2**20)
    assert shard_hashes(one) == shard_hashes(two) and one["counts"] == two["counts"]


# --------------------------------------------------------------------------------------------------------- DatasetDict


def test_datasetdict_splits_from_input_and_classlabel_names(tiny, sentiment, tmp_path):
    manifest = tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(kind="classification"), splits_from_input=True)
    records = sentiment["records"]
    assert {s: m["num_docs"] for s, m in manifest["splits"].items()} == {"train": 50, "val": 12, "test": 9}
    cls = manifest["classification"]
    assert cls["labels"] == ["pos", "neg"] and cls["num_labels"] == 2  # the ClassLabel's order, not sorted
    assert manifest["prep"]["record"]["labels"] == ["pos", "neg"]
    assert manifest["prep"]["splits"]["from_input"] is True
    d = str(sentiment["dir"])
    assert manifest["input_splits"] == {"train": [f"{d}['train']"], "val": [f"{d}['validation']"],
                                        "test": [f"{d}['test']"]}
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = records[theirs]
        shards = ShardSet(tmp_path / "out", ours)
        assert docs_of(shards) == [ids + [0] for ids in reference_ids(tiny["hf"], [r["text"] for r in rows])]
        assert labels_of(shards) == [r["label"] for r in rows]
        assert cls["label_counts"][ours] == [sum(r["label"] == i for r in rows) for i in (0, 1)]
        # The same records as jsonl (label names, --labels in the ClassLabel's order) give identical files.
        jsonl = write_jsonl(tmp_path / f"{theirs}.jsonl", [{"text": r["text"], "label": SENTIMENT["label"].int2str(
            r["label"])} for r in rows])
        same = tokenize_corpus([jsonl], tiny["tokenizer"], tmp_path / f"jsonl_{theirs}",
                               spec=RecordSpec(kind="classification", labels=("pos", "neg")))
        assert shard_hashes(same)["train"] == shard_hashes(manifest)[ours]


def test_datasetdict_without_splits_from_input_reads_train_and_hash_splits_apply(tiny, sentiment, tmp_path, capsys):
    d = sentiment["dir"]
    manifest = tokenize_corpus([f"hf:{d}"], tiny["tokenizer"], tmp_path / "out", val_count=5)
    assert {s: m["num_docs"] for s, m in manifest["splits"].items()} == {"train": 45, "val": 5}
    assert "input_splits" not in manifest and "from_input" not in manifest["prep"]["splits"]
    assert (f"data_prep: hf:{d}: reading split 'train' (splits: 'train', 'validation', 'test'); --hf-split NAME "
            "reads others, --splits-from-input keeps validation/test as our val/test") in capsys.readouterr().err
    # --hf-split picks splits, in the order given
    manifest = tokenize_corpus([f"hf:{d}"], tiny["tokenizer"], tmp_path / "two", hf_splits=["test", "validation"])
    rows = sentiment["records"]["test"] + sentiment["records"]["validation"]
    assert docs_of(ShardSet(tmp_path / "two")) == [ids + [0] for ids in reference_ids(tiny["hf"],
                                                                                      [r["text"] for r in rows])]
    assert manifest["inputs"] == [str(d / s / "data-00000-of-00001.arrow") for s in ("test", "validation")]


def test_num_tasks_and_merge_equal_one_run_with_splits_from_input(tiny, sentiment, tmp_path):
    spec = RecordSpec(kind="classification")
    single = tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "one", spec=spec,
                             splits_from_input=True)
    for task in (0, 1):
        assert tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "tasks", spec=spec,
                               splits_from_input=True, num_tasks=2, task_id=task) is None
    merged = merge(tmp_path / "tasks")
    assert shard_hashes(merged) == shard_hashes(single)
    assert merged["input_splits"] == single["input_splits"] and merged["classification"] == single["classification"]


def test_a_killed_run_resumes_from_its_finished_units(tiny, sentiment, tmp_path, capsys):
    spec = RecordSpec(kind="classification")
    single = tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "one", spec=spec,
                             splits_from_input=True)
    # Units 0 and 2 (train, test: each split is planned apart) done, as a killed run would leave them.
    tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "out", spec=spec,
                    splits_from_input=True, num_tasks=2, task_id=0)
    capsys.readouterr()
    resumed = tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "out", spec=spec,
                              splits_from_input=True)
    assert "data_prep: resuming: 2 of 3 units already done" in capsys.readouterr().err
    assert shard_hashes(resumed) == shard_hashes(single)
    again = tokenize_corpus([f"hf:{sentiment['dir']}"], tiny["tokenizer"], tmp_path / "out", spec=spec,
                            splits_from_input=True)
    assert again == resumed and "nothing to do" in capsys.readouterr().err


def test_sft_prompt_response_and_chat_messages_columns(tiny, tmp_path):
    tok = with_chat_template(tiny["tokenizer"], tmp_path / "tok")
    conv = [{"role": "user", "content": "alpha?"}, {"role": "assistant", "content": "beta"},
            {"role": "user", "content": "gamma?"}, {"role": "assistant", "content": "delta token"}]
    rows = [{"prompt": f"question {i}: alpha?", "response": f" answer {i}", "messages": conv[:2 + 2 * (i % 2)]}
            for i in range(20)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft"))
    jsonl = write_jsonl(tmp_path / "sft.jsonl", rows)
    for spec in (RecordSpec(kind="sft"), RecordSpec(kind="sft", messages_field="messages")):
        name = spec.messages_field or "pr"
        hf = tokenize_corpus([f"hf:{tmp_path / 'sft'}"], tok, tmp_path / f"hf_{name}", spec=spec, val_count=3)
        ref = tokenize_corpus([jsonl], tok, tmp_path / f"ref_{name}", spec=spec, val_count=3)
        assert shard_hashes(hf) == shard_hashes(ref) and hf["sft"] == ref["sft"]
        assert len(masks_of(ShardSet(tmp_path / f"hf_{name}"))) == 17


# ----------------------------------------------------------------------------------------------------------- bad input


def test_classlabel_id_outside_the_names_is_a_bad_record(tiny, tmp_path):
    rows = {"text": ["alpha beta", "gamma", "delta token", "quick"], "label": [0, -1, 1, 0]}
    Dataset.from_dict(rows, features=Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])})
                      ).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError) as info:
        tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "out",
                        spec=RecordSpec(kind="classification"))
    assert str(info.value) == (f"{tmp_path / 'ds'}[1]: label -1 is not an id of the dataset's ClassLabel names (a, b) "
                               "(-1 marks a missing label, as in unlabelled test splits); fix the record, or skip "
                               "such records with --on-bad-record skip")
    manifest = tokenize_corpus([f"hf:{tmp_path / 'ds'}"], tiny["tokenizer"], tmp_path / "skip",
                               spec=RecordSpec(kind="classification", on_bad="skip"))
    assert manifest["counts"]["bad_records"] == {"unknown_label": 1}
    assert labels_of(ShardSet(tmp_path / "skip")) == [0, 1, 0] and manifest["classification"]["labels"] == ["a", "b"]


def test_hf_split_without_hf_input_and_splits_from_input_without_hf_input(tiny, tmp_path):
    jsonl = write_jsonl(tmp_path / "x.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    with pytest.raises(DataError, match="^--hf-split chooses splits of hf: inputs; none is given$"):
        tokenize_corpus([jsonl], tiny["tokenizer"], tmp_path / "a", hf_splits=["train"])
    with pytest.raises(DataError, match=r"^--splits-from-input takes the splits of hf: inputs"):
        tokenize_corpus([jsonl], tiny["tokenizer"], tmp_path / "b", splits_from_input=True)
    (tmp_path / "x.arrow").write_bytes(b"")  # an arrow file is read only as part of an hf: dataset
    with pytest.raises(DataError, match=r"x.arrow: unsupported input type; .* or hf:DIR / hf:NAME for a Hugging"):
        expand_inputs([str(tmp_path / "x.arrow")])
