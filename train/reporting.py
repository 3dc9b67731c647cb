"""What a run tells its user: one line (or progress-bar update) per log interval with loss,
learning rate, tokens/s and MFU, memory peaks, summary.json and its table, and TensorBoard HParams.

Losses stay on the device between log points: an interval adds them up there and reads them back with one
all-reduce. MFU divides by the peak of the precision the matmuls actually run in (`train.flops`), measured with
all ranks at once so that they share the host as in training. Where each figure goes (TensorBoard, metrics.jsonl,
stdout) is `train.metrics`' business.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
import torch.distributed as dist

from data_prep.files import write_atomic
from train import run_dir as layout
from train.config import Config
from train.flops import ModelFlops, peak_flops
from train.metrics import Metrics
from train.precision import Choice


class Reporter:
    def __init__(self, cfg: Config, metrics: Metrics, engine, world_size: int, flops: ModelFlops,
                 precision: Choice, global_batch: int, steps_per_epoch: int, max_steps: int):
        self.cfg, self.metrics, self.engine = cfg, metrics, engine
        self.device = engine.device
        self.world_size, self.flops, self.precision = world_size, flops, precision
        self.global_batch, self.steps_per_epoch, self.max_steps = global_batch, steps_per_epoch, max_steps
        self.peak_flops, self.peak_flops_source = self._peak_flops()
        self.progress_bar = False  # a progress bar replaces the step log lines (rank 0, interactive terminal)
        self.last_train_loss: float | None = None
        self.data_wait_s = 0.0  # seconds this rank spent building batches since the last log point
        self._loss = torch.zeros((), device=self.device)
        self.reset_interval()

    def _peak_flops(self) -> tuple[float, str]:
        """Peak FLOP/s of one rank, averaged over the ranks, and where rank 0's number came from. Collective."""
        peak, source = peak_flops(self.device, self.precision.peak_precision)
        total = torch.tensor([peak], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size, source

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation of the ranks, from tokens/s over all of them."""
        return tokens_per_s / self.world_size * self.flops.flops_per_token / self.peak_flops

    def memory_peaks(self) -> tuple[float, float | None]:
        """(peak resident memory, peak CUDA memory allocated) in GB, each the maximum over the ranks. Collective."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        cuda = torch.cuda.is_available() and self.device.type == "cuda"
        gpu = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        peaks = torch.tensor([rss / 1e9, gpu / 1e9], dtype=torch.float64, device=self.device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        rss_gb, gpu_gb = peaks.tolist()
        return rss_gb, (gpu_gb if cuda else None)

    # ------------------------------------------------------------------------------------------- intervals
    def reset_interval(self) -> None:
        """Start a new log interval (also after a rollback: the interval's losses belong to undone steps)."""
        self._loss.zero_()
        self._steps, self._tokens, self._start = 0, 0, time.perf_counter()
        self.data_wait_s = 0.0

    def add_step(self, loss: torch.Tensor, tokens: int) -> None:
        self._loss += loss
        self._steps += 1
        self._tokens += tokens

    def log_due(self, step: int) -> bool:
        return bool(self._steps) and (step % self.cfg.train.log_every == 0 or step == self.max_steps)

    def log_interval(self, step: int, lr: float, tokens_seen: int) -> None:
        """Log the interval that ends at `step` and start the next. Collective (losses and memory peaks)."""
        dist.all_reduce(self._loss)
        train_loss = self.last_train_loss = self._loss.item() / (self.world_size * self._steps)
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._tokens / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        rss_gb, gpu_gb = self.memory_peaks()
        scalars = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": tokens_per_s, "data/tokens_seen": tokens_seen,
                   "data/epoch": step / self.steps_per_epoch,
                   "train/samples_per_s": self._steps * self.global_batch / elapsed,
                   "train/mfu": self.mfu(tokens_per_s), "sys/mem_rss_gb": rss_gb,
                   "data/wait_share": self.data_wait_s / elapsed}
        if gpu_gb is not None:
            scalars["sys/gpu_mem_gb"] = gpu_gb
        self.metrics.log(step, scalars)
        self.metrics.log_tb(tokens_seen, {"tokens/train_loss": train_loss})
        if self.progress_bar:
            self.metrics.progress(step, {"loss": f"{train_loss:.4f}", "tokens/s": f"{tokens_per_s:,.0f}"})
        else:
            self.metrics.print(f"step {step}/{self.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                               f"grad_norm {grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s")
        self.reset_interval()

    def start_progress(self, step: int) -> None:
        self.progress_bar = self.metrics.start_progress(self.max_steps, step)

    def end_progress(self) -> None:
        self.metrics.end_progress()
        self.progress_bar = False

    # ------------------------------------------------------------------------------------------- the end
    def write_summary(self, summary: dict, tokens_this_session: int) -> dict:
        """Add throughput, MFU and memory to the session's `summary` and write summary.json. Collective."""
        rss_gb, gpu_gb = self.memory_peaks()
        mean_tokens_per_s = (tokens_this_session / summary["wall_seconds"] if summary["steps_this_session"]
                             else None)
        summary.update({
            "mean_tokens_per_s": mean_tokens_per_s, "final_train_loss": self.last_train_loss,
            "flops_per_token": self.flops.flops_per_token, "peak_flops_per_rank": self.peak_flops,
            "peak_flops_source": self.peak_flops_source, "peak_flops_precision": self.precision.peak_precision,
            "precision": self.precision.as_dict(),
            "mean_mfu": self.mfu(mean_tokens_per_s) if mean_tokens_per_s is not None else None,
            "peak_rss_gb": rss_gb, "peak_gpu_mem_gb": gpu_gb})
        if dist.get_rank() == 0:
            write_atomic(self.cfg.run_dir / layout.SUMMARY, json.dumps(summary, indent=2))
        return summary

    def hparams(self, summary: dict, results: dict, step: int) -> None:
        """TensorBoard HParams of a completed run: every scalar config value (dotted keys) and the run's size, with
        its final metrics under hparams/, so runs compare side by side."""
        hparams = {}
        for section, values in self.cfg.to_dict().items():
            for key, value in values.items():
                if isinstance(value, (bool, int, float, str)):
                    hparams[f"{section}.{key}"] = value
                elif value is not None:
                    hparams[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
        hparams.update(world_size=self.world_size, global_batch=self.global_batch, parameters=summary["parameters"],
                       trainable_parameters=summary["trainable_parameters"])
        final = {"hparams/final_train_loss": summary["final_train_loss"], "hparams/mean_mfu": summary["mean_mfu"],
                 "hparams/mean_tokens_per_s": summary["mean_tokens_per_s"]}
        if summary["best"]:
            final[f"hparams/best/{summary['best']['metric']}"] = summary["best"]["value"]
        for name, value in {**(results.get("val_final") or {}), **(results.get("test_after") or {})}.items():
            final[f"hparams/{name}"] = value
        self.metrics.hparams(hparams, final, step)


def summary_table(summary: dict) -> str:
    """The end-of-run summary as a few aligned lines (summary.json has it all)."""
    def number(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = [("steps", f"{summary['steps']:,}/{summary['max_steps']:,} ({summary['steps_this_session']:,} this "
                      "session)" + (", preempted" if summary["preempted"] else "")
                      + (", stopped early" if summary["stopped_early"] else "")),
            ("tokens", f"{summary['tokens_seen']:,}"),
            ("wall time", f"{summary['wall_seconds']:,.1f} s"),
            ("tokens/s", number(summary["mean_tokens_per_s"], ",.0f") + " (mean over the session)"),
            ("MFU", (number(summary["mean_mfu"] * 100 if summary["mean_mfu"] is not None else None, ".2f")
                     + f"% of {summary['peak_flops_per_rank']:.3g} FLOP/s per rank "
                     f"({summary['peak_flops_source']})")),
            ("peak memory", f"{summary['peak_rss_gb']:.2f} GB RSS"
             + (f", {summary['peak_gpu_mem_gb']:.2f} GB GPU" if summary["peak_gpu_mem_gb"] is not None else ""))]
    if summary["best"]:
        best = summary["best"]
        rows.append((f"best {best['metric']}", f"{best['value']:.4f} at step {best['step']}"))
    for name, value in summary["final_val"].items():
        rows.append((f"final {name}", f"{value:.4f}"))
    rows.append(("checkpoint", summary["checkpoint"]))
    width = max(len(name) for name, _ in rows)
    return "run summary\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
