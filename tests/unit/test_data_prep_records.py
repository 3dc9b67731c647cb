"""data_prep.records: raw records -> examples, per record kind. text (the --text-field(s), joined; empty documents
dropped and counted), sft (prompt/response or chat messages rendered with the tokenizer's template, with the loss
mask) and classification (string labels sorted or --labels, integer labels bounded or --num-labels, text pairs);
the bad-record policy (stop at the first with `file:line: reason`, or skip and count by reason). The command-line
flags for each are given to data_prep's main in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.records import RecordSpec, chat_template_sha256
from data_prep.shards import ShardSet
from data_prep.verify import verify_shards
from tests.conftest import (BAD_JSONL, docs_of, expected_docs, masks_of, read_documents,
                            reference_ids, with_chat_template)


# ---------------------------------------------------------------------------------------------------------------- text


def test_missing_or_non_string_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "x", "id": 3}\n')
    with pytest.raises(DataError) as info:
        read_documents([str(path)])
    assert str(info.value) == (f"{path}:3: record has no field 'text' (fields: 'body', 'id'); fix the record or "
                               "pass --text-field with the field that holds the text (now 'text')")
    path.write_text('{"text": 12}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'text' is a JSON number, not a string; fix the record"):
        read_documents([str(path)])
    path.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: record is a JSON array, not an object"):
        read_documents([str(path)])


def test_empty_documents_are_dropped_and_counted(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n{"text": "  \\n\\t"}\n{"text": "two"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    docs, stats = read_documents([str(path), str(tmp_path / "empty.txt")])
    assert [(d.text, d.line) for d in docs] == [("one", 1), ("two", 4)]
    assert (stats.docs_read, stats.docs_empty_dropped) == (5, 3)
    manifest = tokenize_corpus([str(path), str(tmp_path / "empty.txt")], tiny["tokenizer"], tmp_path / "out")
    assert manifest["counts"]["docs_read"] == 5 and manifest["counts"]["docs_empty_dropped"] == 3
    assert manifest["splits"]["train"]["num_docs"] == 2


def test_several_text_fields_are_joined(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"title": "alpha", "body": "beta gamma"}\n{"title": "delta", "body": "token"}\n')
    spec = RecordSpec(text_fields=("title", "body"), field_join=" | ")
    tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", spec=spec)
    assert docs_of(ShardSet(tmp_path / "out")) == expected_docs(tiny, ["alpha | beta gamma", "delta | token"])
    assert main(["tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                 str(tmp_path / "cli"), "--text-field", "title", "--text-field", "body", "--field-join", " | "]) == 0
    assert docs_of(ShardSet(tmp_path / "cli")) == docs_of(ShardSet(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------- the bad-record policy


def test_skip_counts_bad_records_by_reason(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(on_bad="skip"), chunk_mb=40 / 2**20)  # ~40-byte units
    assert manifest["counts"] == {"docs_read": 8, "docs_empty_dropped": 1, "bytes_read": len(BAD_JSONL),
                                  "bad_records": {"invalid_json": 1, "invalid_utf8": 1, "missing_field": 1,
                                                  "not_a_string": 1, "not_an_object": 1}}
    assert docs_of(ShardSet(tmp_path / "out")) == expected_docs(tiny, ["good one", "good two"])


@pytest.mark.parametrize("line, message", [
    (2, "not valid JSON (Expecting value at column 10); fix the record or remove the line"),
    (3, "record is a JSON array, not an object; fix the record or remove the line"),
    (4, "record has no field 'text' (fields: 'body'); fix the record or pass --text-field with the field that "
        "holds the text (now 'text')"),
    (5, "field 'text' is a JSON number, not a string; fix the record or pass --text-field with the field that "
        "holds the text (now 'text')"),
    (6, "not valid UTF-8 (byte 0xe9 at column 14); fix the record or re-encode the file as UTF-8"),
])
def test_default_stops_at_first_bad_record_with_file_line_and_reason(tiny, tmp_path, line, message, monkeypatch):
    monkeypatch.setenv("DATA_PREP_MIN_MB_PER_PROCESS", "0")  # worker processes even for this tiny input
    lines = BAD_JSONL.split(b"\n")
    path = tmp_path / "bad.jsonl"
    # keep only the line under test bad, after 30 good lines, and cut the file into tiny units: the line number
    # is still the line in the file, not in the unit
    path.write_bytes(b'{"text": "good"}\n' * 30 + lines[0] + b"\n" + lines[line - 1] + b"\n" + lines[-1])
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out", chunk_mb=100 / 2**20,
                        workers=2 if line == 2 else 1)
    assert str(info.value) == f"{path}:{30 + 2}: {message}"
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------------------------- sft


def encode_segments(tiny, segments, trainable):
    ids, mask = [], []
    for seg, train, seg_ids in zip(segments, trainable, reference_ids(tiny["hf"], segments)):
        ids += seg_ids
        mask += [int(train)] * len(seg_ids)
    return ids + [0], mask + [1]


def test_sft_prompt_response_tokens_and_mask(tiny, tmp_path):
    records = [{"prompt": f"question {i}: alpha beta?", "response": f" answer {i} gamma delta"} for i in range(40)]
    records.append({"prompt": "no answer", "response": "  "})  # no trainable text: dropped as empty
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = tokenize_corpus([str(tmp_path / "sft.jsonl")], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(kind="sft"), shard_tokens=200, val_fraction=0.1, batch_size=7)
    assert manifest["record_kind"] == "sft"
    expected = [encode_segments(tiny, [r["prompt"], r["response"]], [False, True]) for r in records[:40]]
    got_tokens, got_masks = [], []
    for split in ("train", "val"):
        shards = ShardSet(tmp_path / "out", split)
        got_tokens += docs_of(shards)
        got_masks += masks_of(shards)
        for entry in manifest["splits"][split]["shards"]:
            assert entry["mask"] == entry["file"].replace(".bin", ".mask.bin")
            assert (tmp_path / "out" / entry["mask"]).stat().st_size == entry["num_tokens"]
    assert sorted(zip(map(tuple, got_tokens), map(tuple, got_masks))) == sorted(
        (tuple(t), tuple(m)) for t, m in expected)
    assert manifest["counts"]["docs_empty_dropped"] == 1
    assert manifest["sft"]["format"] == "prompt_response" and manifest["sft"]["mask_dtype"] == "uint8"
    assert sum(manifest["sft"]["mask_tokens"].values()) == sum(sum(m) for _, m in expected)
    assert verify_shards(tmp_path / "out")[0] == []
    mask_file = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["mask"]
    mask_file.write_bytes(bytes([mask_file.read_bytes()[0] ^ 1]) + mask_file.read_bytes()[1:])
    assert verify_shards(tmp_path / "out")[0] == [f"{mask_file}: sha256 differs from the manifest (file changed or "
                                                  "corrupt)"]


def test_sft_chat_messages_rendered_with_template_and_masked(tiny, tmp_path):
    tok = with_chat_template(tiny["tokenizer"], tmp_path / "tok")
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha?"},
            {"role": "assistant", "content": "beta"}, {"role": "user", "content": "gamma?"},
            {"role": "assistant", "content": "delta token"}]
    lines = [json.dumps({"messages": conv}), json.dumps({"messages": conv[:3]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # no assistant: bad
             json.dumps({"messages": "nope"})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    spec = RecordSpec(kind="sft", messages_field="messages", on_bad="skip")
    manifest = tokenize_corpus([str(tmp_path / "chat.jsonl")], tok, tmp_path / "out", spec=spec)
    head = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nalpha?<|im_end|>\n<|im_start|>assistant\n"
    mid = "<|im_start|>user\ngamma?<|im_end|>\n<|im_start|>assistant\n"
    first = encode_segments(tiny, [head, "beta<|im_end|>\n", mid, "delta token<|im_end|>\n"],
                            [False, True, False, True])
    second = encode_segments(tiny, [head, "beta<|im_end|>\n"], [False, True])
    shards = ShardSet(tmp_path / "out")
    assert docs_of(shards) == [first[0], second[0]] and masks_of(shards) == [first[1], second[1]]
    assert manifest["counts"]["bad_records"] == {"bad_messages": 2}
    assert manifest["sft"]["format"] == "messages"
    assert manifest["tokenizer"]["chat_template_sha256"] == chat_template_sha256(tok) is not None
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "chat.jsonl")], tok, tmp_path / "o2",
                        spec=RecordSpec(kind="sft", messages_field="messages"))
    assert str(info.value) == (f"{tmp_path / 'chat.jsonl'}:3: field 'messages' has no assistant message, so nothing "
                               "to train on; fix the record")
    with pytest.raises(DataError, match="the tokenizer has no chat_template"):
        tokenize_corpus([str(tmp_path / "chat.jsonl")], tiny["tokenizer"], tmp_path / "o3", spec=spec)


# ------------------------------------------------------------------------------------------------------ classification


def test_classification_string_labels_sorted_and_pairs(tiny, tmp_path):
    rows = [{"text": f"alpha {i}", "pair": f"beta {i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(30)]
    rows.append({"text": "gamma", "pair": "delta", "label": [1]})  # bad label
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = RecordSpec(kind="classification", text_pair_field="pair", on_bad="skip")
    manifest = tokenize_corpus([str(tmp_path / "cls.jsonl")], tiny["tokenizer"], tmp_path / "out", spec=spec,
                               shard_tokens=50, test_count=5)
    cls = manifest["classification"]
    assert cls["labels"] == ["neg", "neutral", "pos"] and cls["num_labels"] == 3 and cls["text_pair"]
    assert cls["token_type_ids"] is False and manifest["counts"]["bad_records"] == {"bad_label": 1}
    assert manifest["splits"]["test"]["num_docs"] == 5 and manifest["splits"]["train"]["num_docs"] == 25
    got = {}
    for split in ("train", "test"):
        shards = ShardSet(tmp_path / "out", split)
        labels = np.concatenate([shards.labels(i) for i in range(shards.num_shards)])
        assert labels.dtype == np.int64 and cls["label_counts"][split] == np.bincount(labels, minlength=3).tolist()
        for doc, label in zip(docs_of(shards), labels):
            got[tuple(doc)] = cls["labels"][label]
    for r in rows[:30]:
        a, b = reference_ids(tiny["hf"], [r["text"], r["pair"]])
        assert got[tuple(a + [0] + b + [0])] == r["label"]
    assert verify_shards(tmp_path / "out")[0] == []


def test_classification_integer_labels_and_explicit_label_set(tiny, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a", "label": 2}\n{"text": "b", "label": 0}\n')
    manifest = tokenize_corpus([str(tmp_path / "c.jsonl")], tiny["tokenizer"], tmp_path / "o1",
                               spec=RecordSpec(kind="classification"))
    assert manifest["classification"]["labels"] == [0, 1, 2]
    assert ShardSet(tmp_path / "o1").labels(0).tolist() == [2, 0]
    (tmp_path / "n.jsonl").write_text('{"text": "a", "label": -1}\n')
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "n.jsonl")], tiny["tokenizer"], tmp_path / "o0",
                        spec=RecordSpec(kind="classification"))
    assert str(info.value) == (f"{tmp_path / 'n.jsonl'}:1: label field 'label' is -1, not a string or a non-negative "
                               "integer; fix the record")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "yes"}\n{"text": "b", "label": "maybe"}\n')
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(tmp_path / "d.jsonl")], tiny["tokenizer"], tmp_path / "o2",
                        spec=RecordSpec(kind="classification", labels=("no", "yes")))
    assert str(info.value) == (f"{tmp_path / 'd.jsonl'}:2: label 'maybe' is not one of --labels (no, yes); fix the "
                               "record or add it to --labels")
    assert main(["tokenize", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tiny["tokenizer"]),
                 "--output", str(tmp_path / "o3"), "--record-kind", "classification", "--labels", "no,yes,maybe"]) == 0
    manifest = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert manifest["classification"]["labels"] == ["no", "yes", "maybe"]
    assert ShardSet(tmp_path / "o3").labels(0).tolist() == [1, 2]


def _labelled(tmp_path, labels, name="c.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": f"text {i}"})[:-1] + f', "label": {label}}}\n'
                            for i, label in enumerate(labels)))
    return path


def test_undeclared_integer_labels_are_bounded(tiny, tmp_path):
    spec = RecordSpec(kind="classification")
    for raw, message in [
        ("100000000", "label 100000000 is too large: integer labels are class ids, 100,000,001 classes without "
                      "--num-labels or --labels (the limit is 10,000); fix the record or declare the classes with "
                      "--num-labels N"),
        ("100000000000000000000000", "label 100000000000000000000000 is too large"),
        ("1e23", "label field 'label' is a JSON number, not a string or a non-negative integer; fix the record"),
    ]:
        path = _labelled(tmp_path, ["0", "1", raw], f"c{len(raw)}.jsonl")
        with pytest.raises(DataError) as err:
            tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / f"out{len(raw)}", spec=spec)
        assert str(err.value).startswith(f"{path}:3: {message}"), str(err.value)
    path = _labelled(tmp_path, ["0", "9999"], "ok.jsonl")
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "ok", spec=spec)
    assert manifest["classification"]["num_labels"] == 10_000


def test_num_labels_declares_the_classes(tiny, tmp_path):
    path = _labelled(tmp_path, ["0", "2", "1"])
    manifest = tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "out",
                               spec=RecordSpec(kind="classification", num_labels=5))
    cls = manifest["classification"]
    assert (cls["labels"], cls["num_labels"], cls["label_counts"]["train"]) == ([0, 1, 2, 3, 4], 5, [1, 1, 1, 0, 0])
    with pytest.raises(DataError) as err:
        tokenize_corpus([str(path)], tiny["tokenizer"], tmp_path / "o2",
                        spec=RecordSpec(kind="classification", num_labels=2))
    assert str(err.value) == (f"{path}:2: label 2 is not an integer in [0, --num-labels 2); fix the record or raise "
                              "--num-labels (or name string labels with --labels)")
    with pytest.raises(DataError, match=r"--num-labels 0: must be in \[1, 1,000,000\]"):
        RecordSpec(kind="classification", num_labels=0).validate()


def test_empty_label_names_are_refused(tiny, tmp_path):
    with pytest.raises(DataError) as err:
        RecordSpec(kind="classification", labels=("yes", "", "maybe")).validate()
    assert str(err.value) == ("--labels: label 2 of 3 is empty; list the label names separated by commas, e.g. "
                              "--labels neg,neutral,pos")
    path = _labelled(tmp_path, ['"yes"'])
    for labels in ("yes,,maybe", ""):  # as given on the command line
        with pytest.raises(DataError, match=r"^--labels: label "):
            main(["tokenize", "--input", str(path), "--tokenizer", str(tiny["tokenizer"]), "--output",
                  str(tmp_path / "out"), "--record-kind", "classification", "--labels", labels])
