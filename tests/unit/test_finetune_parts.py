"""Fine-tuning parts without DeepSpeed: sft loss masks and packing, classification batches and metrics, evaluation
coverage, early stopping, freezing, and the config checks that guard them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data_prep.shards import ShardSet
from tests.conftest import TINY_ARCHITECTURES
from train import config as config_lib
from train import tasks
from train.best import BestTracker
from train.data import IGNORE, Documents, eval_batches
from train.errors import ConfigError
from train.model import build_model


def sft_documents(finetune_data, packing: bool, seq_len: int = 64) -> Documents:
    shards = ShardSet(finetune_data["sft"], "val")
    return Documents(shards, seq_len, "sft", pad_id=1, packing=packing)


def test_sft_labels_are_the_response_tokens_and_eos_token_by_token(finetune_data, tiny_data):
    tokenizer = Tokenizer.from_file(str(tiny_data["tokenizer"] / "tokenizer.json"))
    records = [json.loads(line) for line in (tiny_data["root"] / "sft.jsonl").read_text().splitlines()]
    docs = sft_documents(finetune_data, packing=False)
    batch, num_tokens = docs.model_batch(np.arange(8))
    for row in range(8):
        ids, mask = docs.example(row)
        record = next(r for r in records if tokenizer.encode(r["prompt"], add_special_tokens=False).ids
                      + tokenizer.encode(r["response"], add_special_tokens=False).ids + [0] == ids.tolist())
        prompt = len(tokenizer.encode(record["prompt"], add_special_tokens=False).ids)
        labels = batch["labels"][row, :len(ids)].tolist()
        assert labels == [IGNORE] * prompt + ids[prompt:].tolist()  # prompt: no loss; response + EOS: loss
        assert batch["labels"][row, len(ids):].eq(IGNORE).all()  # padding: no loss
        assert batch["attention_mask"][row].sum() == len(ids)
    assert num_tokens == sum(len(docs.example(i)[0]) for i in range(8))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_and_unpacked_sft_give_the_same_loss(model_type, finetune_data):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=512, **TINY_ARCHITECTURES[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    indices = np.arange(12)
    losses, rows = {}, {}
    for packing in (False, True):
        batch, _ = sft_documents(finetune_data, packing).model_batch(indices)
        labels = batch.pop("labels")
        rows[packing] = len(labels)
        with torch.no_grad():
            losses[packing] = tasks.loss("sft", model(**batch).logits, labels).item()
    assert rows[True] < rows[False] == 12  # packing really packed
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_packed_rows_never_attend_across_examples(finetune_data):
    batch, _ = sft_documents(finetune_data, packing=True).model_batch(np.arange(12))
    mask, positions = batch["attention_mask"][:, 0], batch["position_ids"]
    for row in range(len(mask)):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        for q in range(mask.shape[1]):
            segment_start = max(s for s in starts if s <= q)
            allowed = set(range(segment_start, q + 1))
            assert set(mask[row, q].nonzero().flatten().tolist()) == allowed


def test_classification_batch_pads_and_keeps_eos_when_truncating(finetune_data):
    shards = ShardSet(finetune_data["cls"], "train")
    full = Documents(shards, 64, "classification", pad_id=1)
    short = Documents(shards, 6, "classification", pad_id=1)
    lengths = [len(full.example(i)[0]) for i in range(40)]
    index = int(np.argmax(lengths))
    ids, label = full.example(index)
    cut, cut_label = short.example(index)
    assert cut.tolist() == ids[:5].tolist() + [ids[-1]] and ids[-1] == 0 and cut_label == label
    batch, _ = full.model_batch(np.array([index, int(np.argmin(lengths))]))
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["input_ids"][1, min(lengths):].eq(1).all() and batch["attention_mask"][1].sum() == min(lengths)
    assert batch["labels"].tolist() == [label, full.example(int(np.argmin(lengths)))[1]]
    every = [len(full.example(i)[0]) for i in range(len(full))]
    assert short.num_cut() == sum(n > 6 for n in every) > 0 and full.num_cut() == sum(n > 64 for n in every)


def test_classification_metrics_match_a_hand_count():
    # true labels and predictions over 3 classes
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    pred = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    logits = torch.full((10, 3), -5.0)
    logits[torch.arange(10), torch.tensor(pred)] = 5.0
    sums = tasks.EvalSums("classification", 3, "cpu")
    sums.add(logits[:6], torch.tensor(true[:6]))
    sums.add(logits[6:], torch.tensor(true[6:]))
    sums.add(logits[:2], torch.tensor([IGNORE, IGNORE]))  # placeholder rows count nothing
    metrics = sums.metrics()
    # class 0: tp 3, fp 1, fn 1 -> f1 6/8; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 3, fp 1, fn 1 -> 6/8
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(true)).item()
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_lm_eval_loss_is_token_weighted_and_ignores_masked_positions():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[3, 1, IGNORE, 2, 4], [IGNORE, IGNORE, IGNORE, IGNORE, 6]])
    sums = tasks.EvalSums("sft", 0, "cpu")
    sums.add(logits, labels)
    pairs = [(0, 0, 1), (0, 2, 3), (0, 3, 4), (1, 3, 4)]  # (row, predicting position, label position)
    by_hand = [torch.nn.functional.cross_entropy(logits[r, p], labels[r, t]).item() for r, p, t in pairs]
    assert sums.metrics()["loss"] == pytest.approx(sum(by_hand) / 4)
    assert tasks.loss("sft", logits, labels).item() == pytest.approx(sum(by_hand) / 4)


@pytest.mark.parametrize("num_items,max_batches", [(21, 0), (16, 0), (3, 0), (21, 2)])
def test_eval_batches_cover_the_split_once_with_equal_passes_per_rank(num_items, max_batches):
    micro, world = 2, 2
    per_rank = [list(eval_batches(num_items, micro, world, rank, max_batches)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = sorted(int(i) for batches in per_rank for b in batches for i in b)
    expected = num_items if not max_batches else min(num_items, max_batches * micro * world)
    assert seen == list(range(expected))


def test_early_stopping_stops_after_patience_evals_without_a_new_best():
    curve = [0.60, 0.70, 0.72, 0.71, 0.72, 0.69, 0.80]  # accuracy per epoch
    tracker = BestTracker("val/accuracy", "max", patience=3)
    new_best, stopped_at = [], None
    for epoch, value in enumerate(curve, start=1):
        new_best.append(tracker.update(epoch, value))
        if tracker.should_stop:
            stopped_at = epoch
            break
    assert new_best == [True, True, True, False, False, False]  # 0.72 again is not better
    assert stopped_at == 6 and tracker.best_step == 3 and tracker.best_value == 0.72
    restored = BestTracker("val/accuracy", "max", patience=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.should_stop and restored.best_step == 3
    low = BestTracker("val/loss", "min", patience=0)
    assert [low.update(s, v) for s, v in enumerate([3.0, float("nan"), 2.5, 2.9])] == [True, False, True, False]
    assert not low.should_stop  # patience 0 never stops


def cfg_for(finetune: dict, kind: str = "causal_lm", **model) -> config_lib.Config:
    return config_lib.from_dict({"task": {"kind": kind}, "model": model, "finetune": finetune,
                                 "data": {"path": "unused", "seq_len": 32}})


def manifest(kind: str = "text") -> dict:
    out = {"record_kind": kind, "tokenizer": {"path": "/nonexistent", "vocab_size": 512, "eos_id": 0, "bos_id": 0,
                                              "pad_id": 1}}
    if kind == "classification":
        out["classification"] = {"labels": ["neg", "pos"], "num_labels": 2}
    return out


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_embeddings_and_bottom_layers(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_embeddings": True, "freeze_bottom_layers": 1}, init="pretrained",
                  path=str(pretrained_models["llama"]))
    model = build_model(cfg, manifest())
    names = {n for n, _ in model.named_parameters()}
    frozen = names - trainable(model)
    assert frozen == {n for n in names if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert "lm_head.weight" in trainable(model)  # llama's head is not tied


def test_freeze_all_but_head_trains_only_the_classifier(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_all_but_head": True}, kind="classification", init="pretrained",
                  path=str(pretrained_models["bert"]))
    model = build_model(cfg, manifest("classification"))
    assert trainable(model) == {"classifier.weight", "classifier.bias"}
    assert model.config.num_labels == 2 and model.config.id2label == {0: "neg", 1: "pos"}


def test_freeze_all_but_a_tied_lm_head_is_refused(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_all_but_head": True}, init="pretrained",
                  path=str(pretrained_models["gpt2"]))
    with pytest.raises(ConfigError, match="has no separate lm_head head \\(it is tied to the input embeddings\\)"):
        build_model(cfg, manifest())


def test_lora_trains_adapters_and_the_classification_head_only(pretrained_models):
    cfg = cfg_for({"method": "lora", "lora_r": 4}, kind="classification", init="pretrained",
                  path=str(pretrained_models["gpt2"]))
    names = trainable(build_model(cfg, manifest("classification")))
    assert names and all("lora_" in n or ".score." in n for n in names)
    assert any(".score." in n for n in names) and any("lora_A" in n for n in names)


def test_a_pretrained_model_with_another_tokenizer_is_refused(pretrained_models, tiny_data, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(pretrained_models["gpt2"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7  # any byte of a tokenizer file
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    info = manifest()
    info["tokenizer"]["path"] = str(tiny_data["tokenizer"])
    cfg = cfg_for({"method": "full"}, init="pretrained", path=str(other))
    with pytest.raises(ConfigError, match=f"model.path: the tokenizer in {other} differs from"):
        build_model(cfg, info)
    build_model(cfg_for({"method": "full"}, init="pretrained", path=str(pretrained_models["gpt2"])), info)


@pytest.mark.parametrize("raw,message", [
    ({"task": {"kind": "translation"}}, "task.kind: must be one of causal_lm, sft, classification"),
    ({"finetune": {"method": "freeze"}}, "finetune.method: is freeze but nothing is frozen"),
    ({"finetune": {"freeze_bottom_layers": 2}}, "finetune.method: is full; the freeze_* keys need method: freeze"),
    ({"model": {"init": "pretrained"}}, "model.path: is required with model.init: pretrained"),
    ({"eval": {"early_stopping_patience": 2}}, "eval.early_stopping_patience: needs eval.best_metric"),
    ({"eval": {"best_metric": "accuracy"}}, "eval.best_metric: must be a validation metric (val/...)"),
    ({"eval": {"best_metric": "val/loss"}, "data": {"path": "x", "val_split": ""}},
     "eval.best_metric: needs a validation split (data.val_split) to measure it on"),
    ({"model": {"dropout": 1.5}}, "model.dropout: must be null or in [0, 1), got 1.5"),
])
def test_finetune_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_lib.from_dict({"data": {"path": "x"}, **raw})
    assert message in str(err.value)


def test_a_missing_pretrained_dir_is_one_error_at_build_time():
    with pytest.raises(ConfigError, match="model.path: /nonexistent is not a directory"):
        build_model(cfg_for({"method": "full"}, init="pretrained", path="/nonexistent"), manifest())


def test_dropout_override_reaches_every_dropout_of_the_model(pretrained_models):
    cfg = cfg_for({"method": "full"}, kind="classification", init="pretrained", path=str(pretrained_models["bert"]),
                  dropout=0.0)
    model = build_model(cfg, manifest("classification"))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_a_pretrained_dir_with_only_pickled_weights_is_refused(pretrained_models, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(pretrained_models["gpt2"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = cfg_for({"method": "full"}, init="pretrained", path=str(pickled))
    with pytest.raises(ConfigError, match=f"model.path: cannot load {pickled} .*convert pickled weights to "
                                          "safetensors"):
        build_model(cfg, manifest())


def test_a_decoder_classifier_uses_the_pad_id_batches_are_padded_with(pretrained_models, tmp_path):
    import shutil

    other = tmp_path / "other_pad"
    shutil.copytree(pretrained_models["gpt2"], other)
    config = json.loads((other / "config.json").read_text())
    config["pad_token_id"] = 7
    (other / "config.json").write_text(json.dumps(config))
    cfg = cfg_for({"method": "full"}, kind="classification", init="pretrained", path=str(other))
    assert build_model(cfg, manifest("classification")).config.pad_token_id == 1  # the manifest's pad id


def test_a_pretrained_model_must_carry_the_tokenizer_and_framing_of_its_shards(tiny_data, pretrained_models,
                                                                              tmp_path):
    import shutil

    from data_prep.manifest import TOKENIZER_FILES
    from train.model import check_tokenizer

    manifest = json.loads((tiny_data["shards"] / "manifest.json").read_text())
    check_tokenizer(pretrained_models["gpt2"], manifest)  # the shards' own tokenizer: accepted
    bare = tmp_path / "bare"
    shutil.copytree(pretrained_models["gpt2"], bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError) as err:
        check_tokenizer(bare, manifest)
    assert str(err.value) == (
        f"model.path: {bare} holds no tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        f"vocab.json, ...), so nothing shows it matches {manifest['tokenizer']['path']}, the tokenizer the shards were "
        f"made with; copy the model's own tokenizer files into {bare}")
    bos_framed = {**manifest, "framing": {**manifest["framing"], "single": [[0], []]}}  # as if made with a BOS
    with pytest.raises(ConfigError) as err:
        check_tokenizer(pretrained_models["gpt2"], bos_framed)
    assert str(err.value) == (
        f"model.path: the tokenizer in {pretrained_models['gpt2']} frames records as [[], []] around a text, the "
        f"shards (made with {manifest['tokenizer']['path']}) as [[0], []]; re-run `python -m data_prep tokenize "
        f"--tokenizer {pretrained_models['gpt2']}`")
