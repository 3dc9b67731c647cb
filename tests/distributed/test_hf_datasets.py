"""A Hugging Face DatasetDict (train / validation / test, ClassLabel) through data_prep and 2 real training steps on
2 ranks: the dataset's splits and label names reach the trainer, and its token ids are those of the same records
given as jsonl."""

from __future__ import annotations

import json
import random

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from tests.conftest import NEGATIVE, POSITIVE, ROOT, data_prep, run_training


def test_datasetdict_with_classlabel_trains_on_its_own_splits(tiny_data, pretrained_models, tmp_path):
    rng = random.Random(11)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    records = {}
    for split, n in (("train", 96), ("validation", 24), ("test", 16)):
        labels = [rng.randint(0, 1) for _ in range(n)]
        texts = [" ".join(rng.choice(POSITIVE if y else NEGATIVE) for _ in range(rng.randint(5, 20))) for y in labels]
        records[split] = {"text": texts, "label": labels}
    DatasetDict({s: Dataset.from_dict(r, features=features) for s, r in records.items()}).save_to_disk(
        str(tmp_path / "sentiment"))
    shards = tmp_path / "shards"
    data_prep("tokenize", "--input", f"hf:{tmp_path / 'sentiment'}", "--tokenizer", str(tiny_data["tokenizer"]),
              "--output", str(shards), "--record-kind", "classification", "--splits-from-input")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert {s: m["num_docs"] for s, m in manifest["splits"].items()} == {"train": 96, "val": 24, "test": 16}
    assert manifest["classification"]["labels"] == ["neg", "pos"]
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        jsonl = tmp_path / f"{theirs}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t, "label": ["neg", "pos"][y]}) + "\n"
                                 for t, y in zip(records[theirs]["text"], records[theirs]["label"])))
        data_prep("tokenize", "--input", str(jsonl), "--tokenizer", str(tiny_data["tokenizer"]), "--output",
                  str(tmp_path / f"jsonl_{theirs}"), "--record-kind", "classification", "--labels", "neg,pos")
        same = json.loads((tmp_path / f"jsonl_{theirs}" / "manifest.json").read_text())
        assert [(e["sha256"], e["labels_sha256"]) for e in same["splits"]["train"]["shards"]] == [
            (e["sha256"], e["labels_sha256"]) for e in manifest["splits"][ours]["shards"]]

    run_training(ROOT / "configs/classify_bert.yaml", [
        f"model.path={pretrained_models['bert']}", f"data.path={shards}", "data.seq_len=64", "train.epochs=0",
        "train.max_steps=2", "train.micro_batch_size=4", "train.log_every=1", "eval.every=2",
        "eval.batches=2", "eval.early_stopping_patience=0", f"run.output_dir={tmp_path}", "run.name=hf"])
    run_dir = tmp_path / "hf"
    summary = json.loads((run_dir / "summary.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert summary["steps"] == 2 and summary["final_train_loss"] == summary["final_train_loss"]  # not NaN
    assert json.loads((run_dir / "data_manifest.json").read_text())["classification"]["labels"] == ["neg", "pos"]
    assert 0.0 <= results["test_after"]["test/accuracy"] <= 1.0
