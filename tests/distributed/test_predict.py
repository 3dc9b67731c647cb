"""train.predict on real 2-rank runs (the trainings of tests/distributed/conftest.py): predicting from an export and
from the run directory (`python -m train.predict RUN_DIR`) agree, and batched, left-padded generation for sft and
causal LM runs equals greedy decoding one prompt at a time."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT, write_classification_corpus, write_sft_corpus
from train.export import export_model


def test_predict_on_an_export_and_on_the_run_dir_agree(lora_run, tmp_path):
    from train.predict import predict_file

    write_classification_corpus(tmp_path / "cls.jsonl", docs=40, seed=7)  # new samples of the training task
    records = [json.loads(line) for line in (tmp_path / "cls.jsonl").read_text().splitlines()]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in records))
    exported = export_model(lora_run, tmp_path / "model", log=lambda *_: None)
    predict_file(exported, path, tmp_path / "from_export.jsonl", batch_size=16, log=lambda *_: None)
    proc = subprocess.run([sys.executable, "-m", "train.predict", str(lora_run), "--input", str(path), "--output",
                           str(tmp_path / "from_run.jsonl"), "--batch-size", "16"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classified 40 record(s)" in proc.stdout and "input's label field on" in proc.stdout
    a = [json.loads(line) for line in (tmp_path / "from_export.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "from_run.jsonl").read_text().splitlines()]
    assert a == b and len(a) == 40
    for out, record in zip(a, records):
        assert out["text"] == record["text"] and out["input_label"] == record["label"]
        assert out["label"] in ("neg", "pos") and set(out["probabilities"]) == {"neg", "pos"}
        assert abs(sum(out["probabilities"].values()) - 1) < 1e-6
        assert out["label"] == max(out["probabilities"], key=out["probabilities"].get)


def test_predict_generates_for_sft_and_causal_runs(zero3_run, zero2_run, tmp_path):
    from train.predict import Predictor, predict_file

    write_sft_corpus(tmp_path / "sft_records.jsonl", docs=5, seed=7)
    sft = [json.loads(line) for line in (tmp_path / "sft_records.jsonl").read_text().splitlines()]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in sft))
    predict_file(zero3_run, tmp_path / "sft.jsonl", tmp_path / "sft_out.jsonl", batch_size=2, max_new_tokens=8,
                 log=lambda *_: None)
    out = [json.loads(line) for line in (tmp_path / "sft_out.jsonl").read_text().splitlines()]
    assert [o["prompt"] for o in out] == [r["prompt"] for r in sft]
    # Batched, left-padded generation equals greedy decoding one prompt at a time with the exported model (after
    # 4 steps the sft model often answers EOS at once: an empty string).
    predictor = Predictor(export_model(zero3_run, tmp_path / "zero3", log=lambda *_: None))
    assert [o["generated"] for o in out] == [greedy(predictor, {"prompt": r["prompt"]}, 8) for r in sft]
    (tmp_path / "text.jsonl").write_text('{"text": "The model reads"}\n{"text": "A small red cat jumps and"}\n')
    counts = predict_file(zero2_run, tmp_path / "text.jsonl", tmp_path / "text_out.jsonl", max_new_tokens=5,
                          log=lambda *_: None)
    out = [json.loads(line) for line in (tmp_path / "text_out.jsonl").read_text().splitlines()]
    assert counts["records"] == 2 and all(o["generated"] for o in out)
    predictor = Predictor(export_model(zero2_run, tmp_path / "zero2", log=lambda *_: None))
    assert [o["generated"] for o in out] == [greedy(predictor, {"text": o["text"]}, 5) for o in out]


def greedy(predictor, record: dict, max_new_tokens: int) -> str:
    ids = predictor.encode(record)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(predictor.model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == predictor.eos:
                break
            new.append(token)
    return predictor.backend.tokenizer.decode(new, skip_special_tokens=True)
