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


def test_sampler_refuses_state_from_other_data_or_batch():
    state = GlobalBatchSampler(50, 2, 2, 2, rank=0, seed=3).state_dict()
    with pytest.raises(ResumeError, match="num_windows=50 but this run has 60"):
        GlobalBatchSampler(60, 2, 2, 2, rank=0, seed=3).load_state_dict(state)
    with pytest.raises(ResumeError, match="global_batch=8 but this run has 16"):
        GlobalBatchSampler(50, 4, 2, 2, rank=0, seed=3).load_state_dict(state)


def test_too_little_data_for_one_step_is_a_config_error():
    with pytest.raises(ConfigError, match="the training split has 7 windows but one optimizer step needs 8"):
        GlobalBatchSampler(7, 2, 2, 2, rank=0, seed=0)


def test_eval_batches_are_equal_per_rank_and_disjoint():
    batches = [list(eval_batches(21, 2, 2, rank, max_batches=10)) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 5
    flat = np.concatenate([np.concatenate(b) for b in batches])
    assert sorted(flat.tolist()) == list(range(20))
