"""train.reporting: the end-of-run summary table."""

from __future__ import annotations

from train.reporting import summary_table


def test_summary_table():
    summary = {"steps": 6, "max_steps": 6, "steps_this_session": 6, "preempted": False, "stopped_early": False,
               "tokens_seen": 6144, "wall_seconds": 12.5, "mean_tokens_per_s": 491.5, "mean_mfu": 0.0123,
               "peak_flops_per_rank": 2.0e11, "peak_flops_source": "measured: cpu bfloat16 matmul, 1 threads",
               "peak_rss_gb": 1.234, "peak_gpu_mem_gb": None,
               "best": {"metric": "val/loss", "mode": "min", "value": 5.5, "step": 3},
               "final_val": {"val/loss": 5.6}, "checkpoint": "runs/x/checkpoints/step_6"}
    assert summary_table(summary).splitlines() == [
        "run summary",
        "  steps           6/6 (6 this session)",
        "  tokens          6,144",
        "  wall time       12.5 s",
        "  tokens/s        492 (mean over the session)",
        "  MFU             1.23% of 2e+11 FLOP/s per rank (measured: cpu bfloat16 matmul, 1 threads)",
        "  peak memory     1.23 GB RSS",
        "  best val/loss   5.5000 at step 3",
        "  final val/loss  5.6000",
        "  checkpoint      runs/x/checkpoints/step_6"]
