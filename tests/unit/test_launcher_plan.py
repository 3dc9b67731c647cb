"""launcher.plan without running anything: the largest micro-batch that fits a memory budget."""

from __future__ import annotations

from launcher import memory, plan


def test_largest_micro_batch_is_what_fits_in_the_budget():
    states = memory.States(weights=100, grads=100, optimizer=300, host=0)
    acts = memory.Activations(checkpointed=40, full=200, micro_batch=4)  # 10 and 50 bytes per sample
    row = plan.Row(stage=2, offload="", states=states, act_checkpointed=40, act_full=200, framework=0)
    precision = plan.precision_lib.Choice("bf16", "bf16", "set in the config")
    p = plan.Plan(2, memory.ModelCounts(10, 10, 5, 0), acts, [row], row, True, 0, 1, False, precision)
    assert plan.largest_micro_batch(p, row, True, budget=500 + 10 * 7 + 9) == 7
    assert plan.largest_micro_batch(p, row, False, budget=500 + 50 * 3) == 3
    assert plan.largest_micro_batch(p, row, False, budget=499) == 0
