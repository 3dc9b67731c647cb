"""train.data: the global batch order (GlobalBatchSampler: ranks partition each global batch, epochs cover every
window, O(1) state restore, another world size, skipped batches), evaluation batches, and the items batches are
built from: sft examples (loss only on the response, packing that never attends across examples), classification
examples (padding, truncation that keeps eos) and blends (each part's items, in proportion to its weight)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data_prep.blend import BlendSampler, load_blend
from data_prep.shards import ShardSet
from tests.conftest import TINY_ARCHITECTURES
from train import tasks
from train.data import IGNORE, BlendedItems, Documents, GlobalBatchSampler, TokenWindows, eval_batches
from train.errors import ConfigError, ResumeError

# ---------------------------------------------------------------------------------------------- the global batch order


def ranks_step(samplers):
    return [sampler.next_step() for sampler in samplers]


def test_ranks_partition_each_global_batch_and_epochs_cover_all_windows():
    num_windows, micro, accum, world = 103, 2, 3, 2  # global batch 12; 8 steps per epoch, 7 windows skipped
    samplers = [GlobalBatchSampler(num_windows, micro, accum, world, rank, seed=7) for rank in range(world)]
    epoch = []
    for _ in range(8):
        step = np.concatenate([np.concatenate(r) for r in ranks_step(samplers)])
        assert len(step) == 12 and len(set(step)) == 12
        epoch.extend(step)
    assert len(set(epoch)) == 96 and set(epoch) <= set(range(num_windows))
    ranks_step(samplers)
    assert samplers[0].epoch == 1 and samplers[0].position == 12


def test_sampler_state_restores_in_o1_and_matches_uninterrupted_order():
    a = GlobalBatchSampler(50, 2, 2, 2, rank=1, seed=3)
    for _ in range(30):  # crosses epoch boundaries (6 steps per epoch)
        a.next_step()
    state = a.state_dict()
    b = GlobalBatchSampler(50, 2, 2, 2, rank=1, seed=3)
    b.load_state_dict(state)
    for _ in range(10):
        assert [x.tolist() for x in a.next_step()] == [x.tolist() for x in b.next_step()]


def test_sampler_refuses_state_from_other_data_or_seed():
    state = GlobalBatchSampler(50, 2, 2, 2, rank=0, seed=3).state_dict()
    with pytest.raises(ResumeError, match="num_windows=50 but this run has 60"):
        GlobalBatchSampler(60, 2, 2, 2, rank=0, seed=3).load_state_dict(state)
    with pytest.raises(ResumeError, match="seed=3 but this run has 4"):
        GlobalBatchSampler(50, 2, 2, 2, rank=0, seed=4).load_state_dict(state)


def test_sampler_continues_the_same_window_sequence_at_another_world_size():
    """2 ranks x accum 2 saved, resumed on 1 rank x accum 4 (same global batch) and on 1 rank x accum 2."""
    def consumed(samplers, steps):
        out = []
        for _ in range(steps):
            per_rank = [s.next_step() for s in samplers]
            micro = samplers[0].micro_batch
            for m in range(samplers[0].accum_steps):  # global order: micro-step, then rank
                for r in range(len(samplers)):
                    out.extend(per_rank[r][m][:micro].tolist())
        return out

    reference = [GlobalBatchSampler(60, 2, 2, 2, rank=r, seed=5) for r in (0, 1)]
    consumed(reference, 3)
    state = reference[0].state_dict()
    expected = consumed(reference, 4)  # 4 steps x 8 windows, crossing the epoch end (7 steps per epoch)
    one_rank = GlobalBatchSampler(60, 2, 4, 1, rank=0, seed=5)
    one_rank.load_state_dict(state)
    assert consumed([one_rank], 4) == expected
    smaller_batch = GlobalBatchSampler(60, 2, 2, 1, rank=0, seed=5)
    smaller_batch.load_state_dict(state)
    assert consumed([smaller_batch], 4)[:16] == expected[:16]


def padded_tokens(sampler, lengths, steps):
    """Tokens the micro-batches of `steps` steps hold once each row is padded to its micro-batch's longest."""
    return sum(len(micro) * int(lengths[micro].max()) for _ in range(steps) for micro in sampler.next_step())


def test_length_grouping_pads_less_covers_every_example_and_resumes_at_any_world_size():
    lengths = np.random.default_rng(0).integers(4, 200, size=1000)
    def sampler(world=2, rank=0, accum=2, group=0, seed=9):
        return GlobalBatchSampler(1000, 4, accum, world, rank, seed, lengths=lengths if group else None,
                                  group_size=group)

    grouped, plain = sampler(group=256), sampler()
    order = grouped._epoch_order()
    assert sorted(order) == list(range(1000))  # a permutation: every example once per epoch
    for start in range(0, 1000, 256):  # each group: the same examples as the plain order's, longest first
        group = order[start:start + 256]
        assert set(group) == set(plain._epoch_order()[start:start + 256])
        assert np.all(np.diff(lengths[group]) <= 0)
    steps = 62  # one epoch at global batch 16
    ratio = padded_tokens(grouped, lengths, steps) / padded_tokens(plain, lengths, steps)
    assert ratio < 0.7  # padding to the longest of 4 random lengths vs of 4 neighbours in sorted order
    assert sampler(group=256, seed=10)._epoch_order().tolist() != order.tolist()  # seeded

    # Resume: the same continuation as uninterrupted, at the same or another world size (same group size in items).
    reference = [sampler(group=256, rank=r) for r in (0, 1)]
    for _ in range(70):  # past the epoch end
        ranks_step(reference)
    state = reference[0].state_dict()
    expected = [np.concatenate([np.concatenate(r) for r in ranks_step(reference)]) for _ in range(5)]
    one_rank = sampler(world=1, accum=4, group=256)
    one_rank.load_state_dict(state)
    assert [np.concatenate(one_rank.next_step()).tolist() for _ in range(5)] == [
        np.concatenate([e[0:4], e[8:12], e[4:8], e[12:16]]).tolist() for e in expected]  # rank-major -> global order
    with pytest.raises(ResumeError, match="length_grouping=256 but this run has 128"):
        sampler(group=128).load_state_dict(state)
    with pytest.raises(ResumeError, match="length_grouping=0 but this run has 256"):  # a state saved before grouping
        sampler(group=256).load_state_dict({k: v for k, v in sampler().state_dict().items() if k != "length_grouping"})


def test_too_little_data_for_one_step_is_a_config_error():
    with pytest.raises(ConfigError, match=r"the training split has 7 items \(windows of data.seq_len tokens, or "
                                          r"examples\) but one optimizer step needs 8"):
        GlobalBatchSampler(7, 2, 2, 2, rank=0, seed=0)


def test_skipped_batches_are_passed_over_and_survive_state_restore():
    plain = GlobalBatchSampler(40, 2, 1, 2, rank=0, seed=1)  # global batch 4, 10 steps per epoch
    order = [plain.next_step()[0].tolist() for _ in range(12)]
    sampler = GlobalBatchSampler(40, 2, 1, 2, rank=0, seed=1)
    sampler.skip([(0, 8), (0, 36), (1, 0)])  # steps 3 and 10 of epoch 0, step 1 of epoch 1
    got = [sampler.next_step()[0].tolist() for _ in range(9)]
    assert got == order[:2] + order[3:9] + order[11:12]
    assert sampler.step_start == (1, 4)
    restored = GlobalBatchSampler(40, 2, 1, 2, rank=0, seed=1)
    restored.load_state_dict(sampler.state_dict())
    assert restored.skipped == {(0, 8), (0, 36), (1, 0)}


# -------------------------------------------------------------------------------------------------- evaluation batches


def test_eval_batches_are_equal_per_rank_and_disjoint():
    batches = [list(eval_batches(21, 2, 2, rank, max_batches=10)) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 5
    flat = np.concatenate([np.concatenate(b) for b in batches])
    assert sorted(flat.tolist()) == list(range(20))


@pytest.mark.parametrize("num_items,max_batches", [(21, 0), (16, 0), (3, 0), (21, 2)])
def test_eval_batches_cover_the_split_once_with_equal_passes_per_rank(num_items, max_batches):
    micro, world = 2, 2
    per_rank = [list(eval_batches(num_items, micro, world, rank, max_batches)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = sorted(int(i) for batches in per_rank for b in batches for i in b)
    expected = num_items if not max_batches else min(num_items, max_batches * micro * world)
    assert seen == list(range(expected))


# ------------------------------------------------------------------------------------- sft and classification examples


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
    # length grouping reads the lengths from the document index: those of the examples as batched
    assert full.lengths().tolist() == every and short.lengths().tolist() == [min(n, 6) for n in every]


# -------------------------------------------------------------------------------------------------------------- blends


def test_blended_items_are_the_parts_items_in_proportion(blend_spec):
    sets, weights = load_blend(blend_spec, "train")
    parts = [TokenWindows(s, 32) for s in sets]
    items = BlendedItems(parts, BlendSampler(sets, weights, 32, seed=7))
    assert len(items) == len(parts[0]) + len(parts[1])
    order = GlobalBatchSampler(len(items), 8, 1, 1, 0, seed=7)
    from_part = np.zeros(2)
    for _ in range(200):
        (indices,) = order.next_step()
        batch, tokens = items.model_batch(indices)
        assert tokens == 8 * 32 and batch["input_ids"].shape == (8, 32)
        for row, (part, item) in zip(batch["input_ids"], items._locate(indices)):
            assert row.tolist() == parts[part].batch(np.array([item]))[0].tolist()
            from_part[part] += 1
    assert from_part[0] / from_part.sum() == pytest.approx(0.75, abs=0.03)
    assert items.realised() == pytest.approx([0.75, 0.25], abs=0.02)


def test_blended_examples_have_the_lengths_of_the_examples_they_are(finetune_data):
    sets = [ShardSet(finetune_data["cls"], split) for split in ("train", "val")]
    parts = [Documents(one, 12, "classification", pad_id=1) for one in sets]
    items = BlendedItems(parts, BlendSampler(sets, [1, 2], None, seed=3))
    assert items.lengths().tolist() == [len(parts[p].example(i)[0]) for p, i in items._locate(np.arange(len(items)))]
