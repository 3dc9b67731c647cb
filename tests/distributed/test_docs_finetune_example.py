"""docs/finetune.md's example on a real pretrained encoder, offline, as the doc runs it: all-MiniLM-L6-v2 (a
BERT-family encoder, tests/real_files.py) fine-tuned for sentiment with configs/classify_bert.yaml on 2 ranks, test
accuracy before and after fine-tuning in results.json, then `train.predict` on new sentences."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, run_training

NEW_REVIEWS = {"An absolutely wonderful, moving picture with a brilliant cast.": "pos",
               "What a dull and tedious film; I was bored the whole time.": "neg"}


def run(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sentiment_fine_tuning_of_a_real_bert_raises_test_accuracy(real_model_dir, tmp_path):
    model = real_model_dir("bert")
    run("-m", "data_prep", "demo-corpus", "--kind", "sentiment", "--output", str(tmp_path / "reviews.jsonl"))
    run("-m", "data_prep", "tokenize", "--input", str(tmp_path / "reviews.jsonl"), "--tokenizer", str(model),
        "--output", str(tmp_path / "shards"), "--record-kind", "classification", "--val-count", "100",
        "--test-count", "200")
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["framing"]["single"] == [[101], [102]]  # [CLS] review [SEP], as BERT was pretrained
    run_training(ROOT / "configs/classify_bert.yaml",
                 [f"model.path={model}", f"data.path={tmp_path / 'shards'}", "data.seq_len=64", "train.epochs=2",
                  f"run.output_dir={tmp_path}", "run.name=sentiment"])

    summary = json.loads((tmp_path / "sentiment/summary.json").read_text())
    assert summary["items_cut"] == {"train": 0, "val": 0, "test": 0}  # short reviews: nothing cut at seq_len 64
    results = json.loads((tmp_path / "sentiment/results.json").read_text())
    before, after = results["test_before"]["test/accuracy"], results["test_after"]["test/accuracy"]
    assert after >= 0.95 and after > before + 0.2, results
    assert results["test_gain"]["test/accuracy"] == after - before

    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in NEW_REVIEWS))
    run("-m", "train.predict", str(tmp_path / "sentiment"), "--input", str(tmp_path / "new.jsonl"), "--output",
        str(tmp_path / "predicted.jsonl"), "--device", "cpu")
    predicted = [json.loads(line) for line in (tmp_path / "predicted.jsonl").read_text().splitlines()]
    assert {p["text"]: p["label"] for p in predicted} == NEW_REVIEWS
