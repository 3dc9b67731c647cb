"""train.predict without training (tiny random models, everything in this process): records encode to exactly the
ids data_prep put in the shards (and that the trainer feeds the model), batching does not change a prediction, an
exported model's export.json checksums are checked, and bad input or bad arguments stop with one `error: ...` line
naming the file and line. Predicting with trained runs: tests/distributed/test_predict.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_prep.pipeline import tokenize_corpus
from data_prep.records import RecordSpec
from data_prep.shards import ShardSet
from tests.conftest import (docs_of, error_of, read_jsonl, write_classification_corpus, write_jsonl,
                            write_sft_corpus)
from train import checkpoint as ckpt
from train import predict as predict_lib
from train.data import Documents

# ------------------------------------------------------------------------------------------------------------ encoding


def test_classification_records_encode_to_the_ids_the_shards_hold(tok, cls_model, tmp_path):
    write_classification_corpus(tmp_path / "cls.jsonl", docs=60)
    records = read_jsonl(tmp_path / "cls.jsonl")
    spec = RecordSpec(kind="classification", labels=("neg", "pos"))
    manifest = tokenize_corpus([str(tmp_path / "cls.jsonl")], tok / "tokenizer", tmp_path / "shards", spec=spec,
                               val_count=10)
    assert manifest["splits"]["train"]["num_docs"] + manifest["splits"]["val"]["num_docs"] == 60
    in_shards = {}
    for split in ("train", "val"):
        shards = ShardSet(tmp_path / "shards", split)
        labels = np.concatenate([shards.labels(i) for i in range(len(shards))])
        for doc, label in zip(docs_of(shards), labels):
            in_shards[tuple(doc)] = manifest["classification"]["labels"][label]
    predictor = predict_lib.Predictor(cls_model)
    for record in records:
        ids = predictor.encode(record)
        assert ids[-1] == 0  # eos closes the example, as in the shards
        assert in_shards[tuple(ids)] == record["label"]


def test_text_pairs_and_long_texts_encode_and_cut_like_data_prep_and_the_trainer(tok, cls_model, tmp_path):
    records = [{"q": f"the model reads {'red ' * (i * 7)}cat", "a": f"a dog {i} runs", "label": ["neg", "pos"][i % 2]}
               for i in range(8)]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    spec = RecordSpec(kind="classification", text_fields=("q",), text_pair_field="a", labels=("neg", "pos"))
    manifest = tokenize_corpus([str(tmp_path / "pairs.jsonl")], tok / "tokenizer", tmp_path / "shards", spec=spec)
    assert manifest["splits"]["train"]["num_docs"] == 8
    shards = ShardSet(tmp_path / "shards", "train")
    seq_len = 16
    items = Documents(shards, seq_len, "classification", pad_id=1)
    full = predict_lib.Predictor(cls_model, text_fields=["q"], text_pair_field="a", max_length=1000)
    cut = predict_lib.Predictor(cls_model, text_fields=["q"], text_pair_field="a", max_length=seq_len)
    assert [full.encode(r) for r in records] == docs_of(shards)  # no split: the shards keep the input order
    assert sum(len(ids) > seq_len for ids in docs_of(shards)) >= 4
    for i, record in enumerate(records):
        assert cut.encode(record) == items.example(i)[0].tolist()


def test_sft_prompts_encode_to_the_untrained_prefix_of_the_shards(tok, lm_model, tmp_path):
    write_sft_corpus(tmp_path / "sft.jsonl", docs=30)
    records = read_jsonl(tmp_path / "sft.jsonl")
    tokenize_corpus([str(tmp_path / "sft.jsonl")], tok / "tokenizer", tmp_path / "shards",
                    spec=RecordSpec(kind="sft"))
    shards = ShardSet(tmp_path / "shards", "train")
    mask, offsets = shards.loss_mask(0), shards.doc_offsets(0)
    predictor = predict_lib.Predictor(lm_model)
    assert not predictor.classify and predictor.spec.prompt_field == "prompt"
    assert len(docs_of(shards)) == len(records) == 30  # the loop below sees every record
    for record, doc, (a, b) in zip(records, docs_of(shards), zip(offsets[:-1], offsets[1:])):
        prompt_len = int(np.argmax(mask[a:b]))  # the prompt is the untrained prefix; eos is never in it
        assert predictor.encode(record) == doc[:prompt_len]


# ---------------------------------------------------------------------------------------------------------- predicting


def test_classification_output_is_independent_of_the_batch(cls_model, tmp_path, capsys):
    records = [{"text": "the cat " * n, "id": n} for n in range(1, 12)]
    records[0]["label"] = records[1]["label"] = "pos"  # a labelled test set: the gold label is kept
    write_jsonl(tmp_path / "in.jsonl", records)
    outs = []
    for batch in (1, 4):
        out = tmp_path / f"out{batch}.jsonl"
        assert predict_lib.main([str(cls_model), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                                 "--batch-size", str(batch), "--device", "cpu"]) == 0
        outs.append(read_jsonl(out))
    agree = sum(o["label"] == "pos" for o in outs[0][:2])
    assert "classified 11 record(s)" in capsys.readouterr().out
    assert [o.get("input_label") for o in outs[0]] == ["pos", "pos"] + [None] * 9
    assert predict_lib.main([str(cls_model), "--input", str(tmp_path / "in.jsonl"), "--output",
                             str(tmp_path / "o.jsonl")]) == 0
    assert f"input's label field on {agree} of 2" in capsys.readouterr().out
    for one, four, record in zip(*outs, records):
        assert one["id"] == record["id"] and one["text"] == record["text"]
        assert one["label"] == four["label"] == max(one["probabilities"], key=one["probabilities"].get)
        assert abs(sum(one["probabilities"].values()) - 1) < 1e-6
        for label in ("neg", "pos"):
            assert one["probabilities"][label] == pytest.approx(four["probabilities"][label], abs=1e-6)
    assert len(outs[0]) == len(records)


def test_generation_is_greedy_left_padded_and_independent_of_the_batch(lm_model, tmp_path):
    records = [{"prompt": p} for p in ("the", "the model reads the data and", "a", "quick slow small large red")]
    write_jsonl(tmp_path / "in.jsonl", records)
    outs = []
    for batch in (1, 4):
        out = tmp_path / f"out{batch}.jsonl"
        assert predict_lib.main([str(lm_model), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                                 "--batch-size", str(batch), "--max-new-tokens", "6"]) == 0
        outs.append(read_jsonl(out))
    assert [r["generated"] for r in outs[0]] == [r["generated"] for r in outs[1]]
    # The same greedy continuation, computed by hand for the first prompt.
    predictor = predict_lib.Predictor(lm_model)
    ids = predictor.encode(records[0])
    with torch.no_grad():
        for _ in range(6):
            nxt = int(predictor.model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == predictor.eos:
                break
            ids.append(nxt)
    expected = predictor.backend.tokenizer.decode(ids[len(predictor.encode(records[0])):], skip_special_tokens=True)
    assert outs[0][0]["generated"] == expected


# -------------------------------------------------------------------------------------------------------------- errors


def test_bad_json_names_the_file_and_line_and_writes_nothing(cls_model, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "a cat"}\n\n{"text": "a dog"\n')
    out = tmp_path / "out.jsonl"
    assert predict_lib.main([str(cls_model), "--input", str(bad), "--output", str(out)]) == 2
    message = error_of(capsys)
    assert f"{bad}:3:" in message and "not valid JSON" in message
    assert list(tmp_path.iterdir()) == [bad]  # no output, no temp file


def test_a_missing_or_non_string_field_names_the_file_line_and_option(cls_model, lm_model, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}, {"txt": "a dog"}])
    assert predict_lib.main([str(cls_model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    message = error_of(capsys)
    assert f"{path}:2:" in message and "'text'" in message and "--text-field" in message
    write_jsonl(path, [{"prompt": 3}])
    assert predict_lib.main([str(lm_model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    message = error_of(capsys)
    assert f"{path}:1:" in message and "'prompt'" in message and "--prompt-field" in message
    assert not (tmp_path / "o.jsonl").exists()


def test_predict_refuses_step_for_an_exported_model_and_a_missing_input(cls_model, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}])
    assert predict_lib.main([str(cls_model), "--input", str(path), "--output", str(tmp_path / "o"),
                             "--step", "3"]) == 2
    assert "--step applies to a run directory" in error_of(capsys)
    assert predict_lib.main([str(cls_model), "--input", str(tmp_path / "nope.jsonl"), "--output",
                             str(tmp_path / "o")]) == 2
    assert "no such file" in error_of(capsys)


def test_predict_checks_the_export_json_checksums(cls_model, tmp_path, capsys):
    model = tmp_path / "exported"
    shutil.copytree(cls_model, model)
    checksums = {p.name: ckpt.file_checksum(p) for p in sorted(model.iterdir()) if p.is_file()}
    (model / "export.json").write_text(json.dumps({"format": "full", "task": "classification",
                                                   ckpt.CHECKSUM: checksums}))
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}])
    assert predict_lib.main([str(model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 0
    capsys.readouterr()
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert predict_lib.main([str(model), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert error_of(capsys) == (f"error: {weights}: content differs from its checksum in export.json (changed or "
                                "damaged since the export); export the run again")


def test_an_empty_prompt_is_one_line_naming_the_input_line(lm_model, cls_model, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}, {"text": ""}])
    out = tmp_path / "o.jsonl"
    assert predict_lib.main([str(lm_model), "--input", str(path), "--output", str(out), "--prompt-field",
                             "text", "--max-new-tokens", "8"]) == 2
    assert error_of(capsys) == (f"error: {path}:2: the prompt (text) is empty: it encodes to no tokens, so there is "
                                "nothing to continue")
    assert not out.exists()
    # classification of an empty text is defined (it encodes to [eos], as data_prep encodes it)
    assert predict_lib.main([str(cls_model), "--input", str(path), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_a_model_directory_holding_only_pickled_weights_is_refused(cls_model, tmp_path, capsys):
    """A .bin checkpoint is a pickle that can run code when loaded: model directories load safetensors only."""
    from transformers import AutoModelForSequenceClassification

    pickled = tmp_path / "pickled"
    model = AutoModelForSequenceClassification.from_pretrained(cls_model)
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()  # the same weights as the pickle transformers still reads
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (cls_model / name).is_file():
            shutil.copy(cls_model / name, pickled / name)
    assert (pickled / "pytorch_model.bin").is_file() and not (pickled / "model.safetensors").exists()
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "a cat"}])
    capsys.readouterr()  # the setup's own loading output
    assert predict_lib.main([str(pickled), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    message = error_of(capsys)
    assert f"{pickled}: cannot load the model" in message and "model.safetensors" in message
