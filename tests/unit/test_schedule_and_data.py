"""lr schedule and the global batch order (pure functions and small state, no processes)."""

import math

import numpy as np
import pytest

from train.config import OptimConfig
from train.data import GlobalBatchSampler, eval_batches
from train.errors import ConfigError, ResumeError
from train.schedule import lr_at


def test_lr_warmup_then_cosine_to_min():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(10, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway through the cosine
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    assert lr_at(500, optim, 110) == pytest.approx(0.1)  # stays at min_lr past max_steps
    values = [lr_at(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_without_warmup_starts_at_peak():
    optim = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, optim, 100) == 2.0
    assert lr_at(25, optim, 100) == pytest.approx(1.0 + math.cos(math.pi / 4))


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


def test_too_little_data_for_one_step_is_a_config_error():
    with pytest.raises(ConfigError, match=r"the training split has 7 items \(windows of data.seq_len tokens, or "
                                          r"examples\) but one optimizer step needs 8"):
        GlobalBatchSampler(7, 2, 2, 2, rank=0, seed=0)


def test_eval_batches_are_equal_per_rank_and_disjoint():
    batches = [list(eval_batches(21, 2, 2, rank, max_batches=10)) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 5
    flat = np.concatenate([np.concatenate(b) for b in batches])
    assert sorted(flat.tolist()) == list(range(20))


def test_checkpoint_retention_keeps_last_n_every_m_and_newest(tmp_path):
    from train.checkpoint import Checkpointer

    for step in (2, 4, 6, 8, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "step_14.partial").mkdir()
    Checkpointer(tmp_path, rank=0, keep_last=2, keep_every=4)._apply_retention(newest=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_12", "step_14.partial", "step_4",
                                                         "step_8"]


def test_checkpoint_retention_never_deletes_the_best(tmp_path):
    from train.checkpoint import Checkpointer

    for step in (2, 4, 6, 8, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
    checkpointer = Checkpointer(tmp_path, rank=0, keep_last=1)
    checkpointer.mark_best(4)
    assert checkpointer.best_tag() == "step_4"
    checkpointer._apply_retention(newest=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_12", "step_4"]


def test_checkpoint_verification_names_the_bad_file(tmp_path):
    import json

    from train.checkpoint import MANIFEST, verify

    tmp_path = tmp_path / "step_3"  # a checkpoint directory is named step_<N>
    tmp_path.mkdir()
    (tmp_path / "a.pt").write_bytes(b"12345")
    assert verify(tmp_path) == "no checkpoint.json (the save did not finish)"
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"a.pt": 5, "b.pt": 1}}))
    assert verify(tmp_path) == "b.pt is missing"
    (tmp_path / "b.pt").write_bytes(b"")
    assert verify(tmp_path) == "b.pt has 0 bytes, checkpoint.json records 1"
    (tmp_path / "b.pt").write_bytes(b"x")
    assert verify(tmp_path) is None


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
