"""data_prep record kinds: sft (prompt/response and chat messages, with a loss mask) and classification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus
from data_prep.records import RecordSpec, chat_template_sha256
from data_prep.shards import ShardSet
from data_prep.verify import verify_shards
from tests.unit.test_data_prep import docs_of, reference_ids, run_cli, tiny  # noqa: F401 (fixture)

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def masks_of(shards: ShardSet) -> list[list[int]]:
    out = []
    for i in range(shards.num_shards):
        mask, offsets = shards.loss_mask(i), shards.doc_offsets(i)
        out += [mask[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return out


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
    tok = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
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
    proc = run_cli("tokenize", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tiny["tokenizer"]),
                   "--output", str(tmp_path / "o3"), "--record-kind", "classification", "--labels", "no,yes,maybe")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert manifest["classification"]["labels"] == ["no", "yes", "maybe"]
    assert ShardSet(tmp_path / "o3").labels(0).tolist() == [1, 2]
