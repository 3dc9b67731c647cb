"""launcher.plan without running anything: the largest micro-batch that fits a memory budget, and --probe-layouts'
choice of ranks x threads layouts, its table and recommendation, and its refusal on a GPU machine."""

from __future__ import annotations

import pytest

from launcher import memory, plan
from tests.conftest import ROOT


def test_largest_micro_batch_is_what_fits_in_the_budget():
    states = memory.States(weights=100, grads=100, optimizer=300, host=0)
    acts = memory.Activations(checkpointed=40, full=200, micro_batch=4)  # 10 and 50 bytes per sample
    row = plan.Row(stage=2, offload="", states=states, act_checkpointed=40, act_full=200, framework=0)
    precision = plan.precision_lib.Choice("bf16", "bf16", "set in the config")
    p = plan.Plan(2, memory.ModelCounts(10, 10, 5, 0), acts, [row], row, True, 0, 1, False, precision)
    assert plan.largest_micro_batch(p, row, True, budget=500 + 10 * 7 + 9) == 7
    assert plan.largest_micro_batch(p, row, False, budget=500 + 50 * 3) == 3
    assert plan.largest_micro_batch(p, row, False, budget=499) == 0


def test_layouts_split_the_cores_smallest_rank_count_first_at_one_global_batch():
    L = plan.Layout
    # 2 cores, micro-batch 4, global batch 8: 1 rank accumulates 2 micro-batches, 2 ranks 1 each.
    assert plan.layouts(2, micro_batch=4, batch=8) == ([L(1, 2, 2), L(2, 1, 1)], [])
    # 16 cores: at most 4 layouts, the smallest rank counts; 16 x 1 is not probed.
    assert plan.layouts(16, micro_batch=1, batch=64) == ([L(1, 16, 64), L(2, 8, 32), L(4, 4, 16), L(8, 2, 8)], [])
    assert plan.layouts(16, micro_batch=1, batch=64, limit=2)[0] == [L(1, 16, 64), L(2, 8, 32)]


def test_layouts_skip_rank_counts_that_cannot_keep_the_global_batch():
    L = plan.Layout
    # A 1-rank run of micro-batch 4 on 2 cores: 2 ranks would need a global batch of at least 8.
    assert plan.layouts(2, micro_batch=4, batch=4) == ([L(1, 2, 1)], [2])
    # 12 cores, micro-batch 2, global batch 8: 3, 6 and 12 ranks do not divide 8 / 2.
    assert plan.layouts(12, micro_batch=2, batch=8) == ([L(1, 12, 4), L(2, 6, 2), L(4, 3, 1)], [3, 6, 12])
    # Skipped rank counts do not use up the 4 probes; the ones after the 4th chosen are not considered.
    assert plan.layouts(24, micro_batch=1, batch=8) == ([L(1, 24, 8), L(2, 12, 4), L(4, 6, 2), L(8, 3, 1)], [3, 6])


def measured(tokens_per_s: float, step_seconds: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "step_seconds": step_seconds, "save_seconds": 0.5}


def test_the_fastest_layout_has_the_most_tokens_per_second_of_those_that_ran():
    one, two, four = plan.Layout(1, 4, 4), plan.Layout(2, 2, 2), plan.Layout(4, 1, 1)
    assert plan.fastest([(one, measured(900, 1.0)), (two, measured(1200, 0.8)), (four, None)]) == two
    assert plan.fastest([(one, None)]) is None


def test_the_recommended_command_keeps_the_global_batch():
    overrides = ["data.path=/d s", "train.micro_batch_size=4"]
    assert plan.launch_command("c.yaml", overrides, plan.Layout(2, 1, 1), configured_accum=1) == (
        "python -m launcher --config c.yaml --nproc 2 'data.path=/d s' train.micro_batch_size=4")
    assert plan.launch_command("c.yaml", overrides, plan.Layout(1, 2, 2), configured_accum=1) == (
        "python -m launcher --config c.yaml --nproc 1 'data.path=/d s' train.micro_batch_size=4 "
        "train.grad_accum_steps=2")


def test_the_layout_table_has_a_row_per_probe_and_names_the_fastest(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = plan.config_lib.load(ROOT / "configs" / "quickstart.yaml", ["train.micro_batch_size=4"])
    row = plan.Row(stage=2, offload="", states=memory.States(1, 1, 1, 0), act_checkpointed=1, act_full=1, framework=0)
    precision = plan.precision_lib.Choice("fp32", "fp32", "set in the config")
    p = plan.Plan(2, memory.ModelCounts(10, 10, 5, 0), memory.Activations(1, 1, 4), [row], row, True, 0, 200,
                  False, precision)
    one, two, four = plan.Layout(1, 4, 2), plan.Layout(2, 2, 1), plan.Layout(4, 1, 1)
    results = [(one, measured(1000.0, 0.5)), (two, measured(1500.0, 0.3))]
    text = plan.render_layouts(cfg, p, 4, [4], results, two, "python -m launcher --config c.yaml --nproc 2")
    lines = text.splitlines()
    assert "global batch 8 (micro-batch 4 x grad accumulation x ranks)" in lines[0]
    assert lines[1].startswith("  skipped 4 rank(s) x 1 thread(s): global batch 8 is not a multiple of micro-batch "
                               "4 x 4 rank(s)")
    # 200 steps at the step time plus 3 saves (every 100 steps and the last) of 0.5 s.
    assert lines[3].split() == ["1", "rank(s)", "x", "4", "thread(s)", "2", "1,000", "0.500", "1m41s"]
    assert lines[4].split() == ["2", "rank(s)", "x", "2", "thread(s)", "1", "1,500", "0.300", "1m01s"]
    assert lines[-1] == "recommended: 2 rank(s) x 2 thread(s): python -m launcher --config c.yaml --nproc 2"
    failed = plan.render_layouts(cfg, p, 4, [], [(four, None)], None, "").splitlines()
    assert "probe failed" in failed[2] and failed[-1] == "recommended: none (every probe failed)"


def test_probe_layouts_refuses_on_a_machine_with_cuda_gpus_before_doing_anything(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert plan.main(["--config", "does-not-exist.yaml", "--probe-layouts"]) == plan.exit_codes.USAGE
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: --probe-layouts is for CPU-only machines; this one has 2 CUDA GPU(s)")


def test_probe_layouts_does_not_go_with_a_gpu_plan(capsys):
    with pytest.raises(SystemExit) as exit_:
        plan.main(["--config", "c.yaml", "--probe-layouts", "--gpu-mem-gb", "80"])
    assert exit_.value.code == 2 and "--probe-layouts" in capsys.readouterr().err
