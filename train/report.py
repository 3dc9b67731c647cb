"""`python -m train.report RUN_DIR`: plot a run's curves from RUN_DIR/metrics.jsonl into RUN_DIR/report.png.

Panels: train loss (and val loss) over steps, learning rate, and every other val/* and test/* metric. Works on a
finished, preempted or still-running run; needs nothing but the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train import exit_codes
from train import run_dir as layout


class ReportError(Exception):
    pass


def read_series(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from metrics.jsonl; a later line for the same step and tag (after a resume or a
    rollback) replaces the earlier one."""
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            raise ReportError(f"{metrics_path}:{number}: not a metrics record") from None
        for tag, value in record.items():
            if tag not in ("step", "time") and isinstance(value, (int, float)):
                series.setdefault(tag, {})[step] = float(value)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot(series: dict[str, list[tuple[int, float]]], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = sorted(tag for tag in series if tag.split("/")[0] in ("val", "test") and tag not in ("val/loss",))
    panels = [["train/loss", "val/loss"], ["train/lr"]] + [[tag] for tag in evals]
    panels = [[tag for tag in panel if tag in series] for panel in panels]
    panels = [panel for panel in panels if panel]
    if not panels:
        raise ReportError(f"nothing to plot: {layout.METRICS} has no train/loss, train/lr, val/* or test/* points "
                          "yet")
    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for tag in panel:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=tag)
        ax.set_xlabel("step")
        ax.set_title(", ".join(panel))
        if panel == ["train/lr"]:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def report(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    metrics_path = run_dir / layout.METRICS
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path} not found: is {run_dir} a run directory of train/main.py "
                          "(<run.output_dir>/<run.name>)?")
    title = str(run_dir)
    summary_path = run_dir / layout.SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        mfu = summary.get("mean_mfu")
        title += f" | {summary['steps']} steps, {summary['tokens_seen']:,} tokens" + (
            f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
    output = run_dir / layout.REPORT
    plot(read_series(metrics_path), title, output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report",
                                     description="Plot a run's loss, learning-rate and eval curves to RUN_DIR/report.png.")
    parser.add_argument("run_dir", type=Path,
                        help=f"the run directory (holds {layout.METRICS} and {layout.SUMMARY})")
    args = parser.parse_args(argv)
    try:
        output = report(args.run_dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    print(output)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
