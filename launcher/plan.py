"""`python -m launcher plan --config X.yaml [--world-size N] [--gpu-mem-gb G] [--probe] [overrides]`

Before a run takes an allocation: the per-rank memory of its model states for ZeRO 0-3 with and without CPU offload,
its activations with and without activation checkpointing at the configured micro-batch and sequence length
(`launcher.memory`), the largest micro-batch that fits, and the checkpoint size on disk. With --probe it then trains
10 steps of the same config on this machine (through the launcher, in a temporary run directory), prints the
measured tokens/s, step time, memory and checkpoint size next to the predictions, and projects the wall time of the
configured run.

With --probe-layouts (CPU-only machines) it measures how to split this machine's cores: N ranks x cores/N threads for
the divisors N of the usable cores (os.sched_getaffinity), smallest N first, at most 4 layouts, each a 10-step probe
at the configured global batch (micro-batch x grad accumulation x planned world size; grad accumulation is set per
layout so that micro-batch x accumulation x N equals it, and a layout where it does not divide is skipped with its
reason). It prints one table (layout, accumulation, tokens/s of the whole machine, s/step, projected wall time) and
the launcher command of the layout with the most tokens/s. On a machine with CUDA GPUs it refuses with one line:
there the layout is one rank per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from train import config as config_lib
from train import exit_codes
from train import ds_config as ds_config_lib
from train import precision as precision_lib
from train import run_dir as layout
from data_prep.errors import DataError
from train.errors import RunError

from launcher import memory

PROBE_STEPS = 10
PROBE_WARMUP = 3  # steps left out of the timing (allocation, first-step set-up)
MAX_LAYOUTS = 4  # --probe-layouts: ranks x threads layouts probed at most, one 10-step probe each
GPU_RESERVE = 1e9  # CUDA context, kernels and allocator slack on each GPU, taken off the budget
CPU_RUNTIME = 0.5e9  # Python + torch + transformers + DeepSpeed code of one CPU rank (~0.37 GB measured here)
# What a CPU rank adds to its runtime while it sets up and trains besides model states and activations: DeepSpeed's
# engine and lazily imported code, autograd and allocator bookkeeping. 50-80 MB on the dev box whatever the model
# size (launcher/memory.py's tests); on a GPU it stays in host memory.
CPU_FRAMEWORK = 64 * 2 ** 20
MB = 2 ** 20


@dataclass(frozen=True)
class Row:
    """One way to run the config: a ZeRO stage, what is offloaded, and its per-rank memory in bytes."""
    stage: int
    offload: str  # "", "optimizer" or "optimizer+params"
    states: memory.States
    act_checkpointed: int
    act_full: int
    framework: int  # CPU_FRAMEWORK on CPU, 0 on a GPU

    @property
    def name(self) -> str:
        return f"zero{self.stage}" + (f" + offload {self.offload}" if self.offload else "")

    def total(self, checkpointing: bool) -> int:
        return self.states.device + (self.act_checkpointed if checkpointing else self.act_full) + self.framework


@dataclass(frozen=True)
class Plan:
    world_size: int
    counts: memory.ModelCounts
    activations: memory.Activations
    rows: list[Row]
    configured: Row  # the row of the run's own preset and activation checkpointing setting
    checkpointing: bool
    checkpoint_bytes: int
    total_steps: int
    gpu: bool  # planned for GPUs (flash attention) rather than CPUs like this machine
    precision: "precision_lib.Choice"  # train.precision as the run would resolve it


def estimate(cfg: config_lib.Config, world_size: int, gpu: bool) -> Plan:
    """The plan of a run at `world_size` ranks on GPUs (`gpu`) or on CPUs like this machine's."""
    from train.data import open_split, run_steps, split_items

    choice = planned_precision(cfg.train.precision, gpu)
    cfg = precision_lib.with_precision(cfg, choice.precision)
    manifest, shards = open_split(cfg, cfg.data.train_split)
    ds = ds_config_lib.build(cfg, world_size)
    # Only train.epochs needs the items counted (as the Trainer does); the global batch is DeepSpeed's.
    num_items = len(split_items(cfg, shards, manifest)) if cfg.train.epochs else 0
    total_steps = run_steps(cfg, num_items, ds["train_batch_size"])[1]
    zero = memory.zero_settings(ds)
    counts = memory.count(cfg, manifest, zero["persistence"])
    acts = memory.trace_activations(cfg, manifest, gpu)
    p = cfg.train.precision

    def row(stage, offload=""):
        s = memory.states(counts, stage, world_size, p, zero, offload_optimizer=bool(offload),
                          offload_params=offload == "optimizer+params")
        return Row(stage, offload, s, acts.checkpointed, acts.full, 0 if gpu else CPU_FRAMEWORK)

    rows = [row(stage) for stage in memory.STAGES]
    rows += [row(2, "optimizer"), row(3, "optimizer"), row(3, "optimizer+params")]
    zero_cfg = ds.get("zero_optimization", {})

    def offloaded(key):  # {"device": "cpu" | "nvme" | "none"}
        return zero_cfg.get(key, {}).get("device", "none") != "none"

    configured_offload = ("optimizer+params" if offloaded("offload_param") else
                          "optimizer" if offloaded("offload_optimizer") else "")
    stage = ds_config_lib.zero_stage(ds)
    configured = next((r for r in rows if r.stage == stage and r.offload == configured_offload), row(stage))
    return Plan(world_size, counts, acts, rows, configured, cfg.model.activation_checkpointing,
                memory.checkpoint_bytes(counts, p), total_steps, gpu, choice)


def memory_budget(gpu_mem_gb: float | None, local_ranks: int) -> tuple[float, str]:
    """(bytes one rank may use for states + activations, where the number comes from)."""
    if gpu_mem_gb is not None:
        return gpu_mem_gb * 1e9 - GPU_RESERVE, f"--gpu-mem-gb {gpu_mem_gb:g} minus {GPU_RESERVE / 1e9:g} GB reserve"
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return total - GPU_RESERVE, f"{torch.cuda.get_device_name(0)}, {total / 1e9:.0f} GB minus reserve"
    import psutil

    available = psutil.virtual_memory().available / local_ranks - CPU_RUNTIME
    return available, (f"this host: available memory / {local_ranks} rank(s) minus {CPU_RUNTIME / 1e9:g} GB "
                       "runtime per rank (use --gpu-mem-gb for a GPU cluster)")


def largest_micro_batch(plan: Plan, row: Row, checkpointing: bool, budget: float) -> int:
    per_sample = (row.act_checkpointed if checkpointing else row.act_full) / plan.activations.micro_batch
    return max(0, math.floor((budget - row.states.device - row.framework) / per_sample)) if per_sample else 0


def _mb(n: float) -> str:
    return f"{n / MB:,.0f}"


def render(cfg: config_lib.Config, plan: Plan, budget: float, budget_source: str) -> str:
    c, a = plan.counts, plan.activations
    lines = [
        f"plan: {cfg.run.name}, world size {plan.world_size}, {plan.precision.precision}, micro-batch "
        f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, grad accumulation {cfg.train.grad_accum_steps}, "
        f"{plan.total_steps:,} steps",
        f"precision: {plan.precision.precision} ({plan.precision.reason})",
        *([plan.precision.warning] if plan.precision.warning else []),
        f"model: {c.total:,} parameters, {c.trainable:,} trained; largest layer {c.largest_layer:,}",
        f"activations per micro-batch (traced): {_mb(a.checkpointed)} MB with activation checkpointing, "
        f"{_mb(a.full)} MB without",
        f"budget per rank: {_mb(budget)} MB ({budget_source})",
        *([] if plan.gpu else [f"totals include {_mb(CPU_FRAMEWORK)} MB per rank of framework working memory (CPU)"]),
        "",
        f"{'per rank, MB':<34}weights    grads  optimizer     host | ckpt: act    total max-mb | no ckpt: act "
        "   total max-mb",
    ]
    for r in plan.rows:
        mark = "*" if r == plan.configured else " "
        s = r.states
        lines.append(
            f"{mark} {r.name:<32}{_mb(s.weights):>7} {_mb(s.grads):>8} {_mb(s.optimizer):>10} {_mb(s.host):>8} |"
            f" {_mb(r.act_checkpointed):>9} {_mb(r.total(True)):>8} {largest_micro_batch(plan, r, True, budget):>6} |"
            f" {_mb(r.act_full):>12} {_mb(r.total(False)):>8} {largest_micro_batch(plan, r, False, budget):>6}")
    total = plan.configured.total(plan.checkpointing)
    verdict = "fits" if total <= budget else "DOES NOT FIT"
    lines += [
        "",
        f"configured (*, activation checkpointing {'on' if plan.checkpointing else 'off'}): {_mb(total)} MB per "
        f"rank: {verdict} in {_mb(budget)} MB",
        f"checkpoint on disk: {_mb(plan.checkpoint_bytes)} MB per save (all ranks)",
    ]
    return "\n".join(lines)


def probe_overrides(output_dir: str) -> list[str]:
    """A short, side-effect-free copy of the run: fixed steps, logged every step, no evaluation, its own run dir."""
    return [f"train.max_steps={PROBE_STEPS}", "train.epochs=0", "train.log_every=1", "eval.every=0",
            "eval.at_epoch_end=false", "checkpoint.every=0", "eval.best_metric=''",
            "eval.early_stopping_patience=0", "data.val_split=''", "data.test_split=''",
            f"run.output_dir={output_dir}", "run.name=probe", "run.resume=never"]


def probe(config: str, overrides: list[str], nproc: int, threads: int | None = None) -> dict:
    """Train PROBE_STEPS steps of the config through the launcher on this machine; measured figures. `threads`:
    OMP_NUM_THREADS of each rank (default: the environment's, else the launcher's share of the cores).

    tokens_per_s is the whole run's, all ranks together, over the same steps and clock as step_seconds: the growth of
    `data/tokens_seen` in metrics.jsonl (each step's tokens summed over the ranks: the trainer all-reduces them) over
    the growth of its `time` (rank 0's clock). Each record's `train/tokens_per_s` is the same count over one step's
    interval; their mean would overweight the fast steps of a noisy machine."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryDirectory(prefix="reparam-plan-probe-") as tmp:
        command = [sys.executable, "-m", "launcher", "--config", config, "--nproc", str(nproc), *overrides,
                   *probe_overrides(tmp)]
        proc = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                              env=env)
        run_dir = Path(tmp) / "probe"
        if proc.returncode != 0 or not (run_dir / layout.SUMMARY).is_file():
            raise RunError(f"probe run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / layout.SUMMARY).read_text())
        records = [json.loads(line) for line in (run_dir / layout.METRICS).read_text().splitlines()]
        train = {r["step"]: r for r in records if "train/loss" in r}
        saves = [r["ckpt/save_seconds"] for r in records if "ckpt/save_seconds" in r]
        timed = train[PROBE_STEPS]["time"] - train[PROBE_WARMUP]["time"]
        tokens = train[PROBE_STEPS]["data/tokens_seen"] - train[PROBE_WARMUP]["data/tokens_seen"]
        checkpoint_bytes = sum(f.stat().st_size for f in Path(summary["checkpoint"]).rglob("*") if f.is_file())
    gpu = summary.get("peak_gpu_mem_gb")
    return {
        "ranks": nproc, "step_seconds": timed / (PROBE_STEPS - PROBE_WARMUP), "tokens_per_s": tokens / timed,
        "save_seconds": saves[-1] if saves else None, "checkpoint_bytes": checkpoint_bytes,
        # Device memory on a GPU; on CPU the resident memory above what the rank held before building the model.
        "peak_bytes": gpu * 1e9 if gpu is not None else (summary["peak_rss_gb"] - summary["rss_before_model_gb"]) * 1e9,
        "memory_kind": "GPU memory allocated" if gpu is not None else "resident memory above the runtime",
        "runtime_bytes": None if gpu is not None else summary["rss_before_model_gb"] * 1e9,
    }


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def checkpoint_saves(cfg: config_lib.Config, plan: Plan) -> int:
    """Checkpoints the configured run writes: one every checkpoint.every steps and the final one."""
    return (plan.total_steps // cfg.checkpoint.every if cfg.checkpoint.every else 0) + 1


def _saves(cfg: config_lib.Config, plan: Plan) -> str:
    saves = checkpoint_saves(cfg, plan)
    return f"{saves} checkpoint save{'' if saves == 1 else 's'}"


def projected_wall(cfg: config_lib.Config, plan: Plan, measured: dict) -> float:
    """Seconds the configured run would take at the measured step and save times (evaluation not included)."""
    return plan.total_steps * measured["step_seconds"] + checkpoint_saves(cfg, plan) * (measured["save_seconds"] or 0)


def render_probe(cfg: config_lib.Config, plan: Plan, measured: dict) -> str:
    predicted = plan.configured.total(plan.checkpointing)
    peak = measured["peak_bytes"]
    wall = projected_wall(cfg, plan, measured)
    lines = [f"probe: {PROBE_STEPS} steps on this machine, {measured['ranks']} rank(s)",
             f"  {measured['tokens_per_s']:,.0f} tokens/s, {measured['step_seconds']:.3f} s per step "
             f"(steps {PROBE_WARMUP + 1}-{PROBE_STEPS})",
             f"  peak memory per rank: {_mb(peak)} MB {measured['memory_kind']}; predicted {_mb(predicted)} MB "
             f"({(predicted - peak) / peak:+.0%})" + (" for a GPU (this probe ran on CPU)"
                                                      if plan.gpu and measured["runtime_bytes"] is not None else "")]
    if measured["runtime_bytes"] is not None:
        lines.append(f"  runtime before the model was built: {_mb(measured['runtime_bytes'])} MB per rank")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            lines.append("  (the trainer keeps freed memory in glibc's heap for speed, so RSS exceeds the live peak; "
                         "MALLOC_MMAP_THRESHOLD_=131072 measures the live peak: docs/observability.md)")
    lines += [f"  checkpoint: {_mb(measured['checkpoint_bytes'])} MB on disk (predicted "
              f"{_mb(plan.checkpoint_bytes)} MB), saved in {measured['save_seconds'] or 0:.2f} s",
              f"  projected wall time of {plan.total_steps:,} steps: {_duration(wall)} ({_saves(cfg, plan)} "
              f"included, evaluation not)"]
    if measured["ranks"] != plan.world_size:
        lines.append(f"  (per-rank speed measured with {measured['ranks']} rank(s); the projection assumes it holds "
                     f"at {plan.world_size})")
    return "\n".join(lines)


@dataclass(frozen=True)
class Layout:
    """One way to split this machine's cores for the run: `ranks` ranks of `threads` threads, with the gradient
    accumulation that keeps the configured global batch."""
    ranks: int
    threads: int
    grad_accum_steps: int

    @property
    def name(self) -> str:
        return f"{self.ranks} rank(s) x {self.threads} thread(s)"

    @property
    def accum_override(self) -> str:
        return f"train.grad_accum_steps={self.grad_accum_steps}"


def usable_cores() -> int:
    """The cores this process may run on (a Slurm cgroup or taskset narrows them), as the launcher counts them."""
    return len(os.sched_getaffinity(0))


def global_batch(cfg: config_lib.Config, world_size: int) -> int:
    """Samples per optimizer step of the planned run, as DeepSpeed's train_batch_size."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size


def layouts(cores: int, micro_batch: int, batch: int, limit: int = MAX_LAYOUTS) -> tuple[list[Layout], list[int]]:
    """(the layouts N ranks x cores/N threads to probe: N the divisors of `cores`, smallest first, at most `limit`,
    each with the grad accumulation that keeps the global `batch`; the N passed over on the way because micro-batch
    x N does not divide `batch`)."""
    chosen, skipped = [], []
    for ranks in (n for n in range(1, cores + 1) if cores % n == 0):
        if len(chosen) == limit:
            break
        if batch % (micro_batch * ranks):
            skipped.append(ranks)
        else:
            chosen.append(Layout(ranks, cores // ranks, batch // (micro_batch * ranks)))
    return chosen, skipped


def probe_layouts(config: str, overrides: list[str], chosen: list[Layout]) -> list[tuple[Layout, dict | None]]:
    """Each layout's probe (None where its run failed: the reason goes to stderr), progress on stderr."""
    results = []
    for layout in chosen:
        print(f"probing {layout.name}, grad accumulation {layout.grad_accum_steps} ...", file=sys.stderr, flush=True)
        try:
            results.append((layout, probe(config, [*overrides, layout.accum_override], layout.ranks,
                                          threads=layout.threads)))
        except RunError as exc:
            print(f"{layout.name}: {exc}", file=sys.stderr, flush=True)
            results.append((layout, None))
    return results


def fastest(results: list[tuple[Layout, dict | None]]) -> Layout | None:
    """The layout with the most tokens/s of the whole machine (at an equal global batch: the shortest run)."""
    measured = [(m["tokens_per_s"], layout) for layout, m in results if m is not None]
    return max(measured, key=lambda pair: pair[0])[1] if measured else None


def launch_command(config: str, overrides: list[str], layout: Layout, configured_accum: int) -> str:
    """The launcher command that trains the configured run in `layout` (its grad accumulation where it differs from
    the configured one)."""
    accum = [layout.accum_override] if layout.grad_accum_steps != configured_accum else []
    return shlex.join(["python", "-m", "launcher", "--config", config, "--nproc", str(layout.ranks), *overrides,
                       *accum])


def render_layouts(cfg: config_lib.Config, plan: Plan, cores: int, skipped: list[int],
                   results: list[tuple[Layout, dict | None]], best: Layout | None, command: str) -> str:
    """The skipped layouts, one table row per probed layout, and the `recommended:` line."""
    batch = global_batch(cfg, plan.world_size)
    micro = cfg.train.micro_batch_size
    lines = [f"layouts: {PROBE_STEPS} steps each on this machine's {cores} usable core(s), global batch {batch} "
             f"(micro-batch {micro} x grad accumulation x ranks) in every layout",
             *(f"  skipped {n} rank(s) x {cores // n} thread(s): global batch {batch} is not a multiple of "
               f"micro-batch {micro} x {n} rank(s) (a larger --world-size or train.grad_accum_steps includes it)"
               for n in skipped),
             f"  {'layout':<26}{'accum':>6}{'tokens/s':>11}{'s/step':>9}  projected wall ({plan.total_steps:,} steps)"]
    for layout, m in results:
        figures = (f"{m['tokens_per_s']:>11,.0f}{m['step_seconds']:>9.3f}  {_duration(projected_wall(cfg, plan, m))}"
                   if m else "  probe failed (its output is above, on stderr)")
        lines.append(f"  {layout.name:<26}{layout.grad_accum_steps:>6}{figures}")
    lines.append("  (tokens/s: all ranks together; projected wall: steps at the measured s/step plus "
                 f"{_saves(cfg, plan)}, evaluation not included)")
    if os.environ.get("OMP_NUM_THREADS"):
        lines.append(f"  (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set here and the launcher keeps it: "
                     "unset it, or set it to the recommended threads, when you run the command below)")
    lines.append(f"recommended: {best.name}: {command}" if best else "recommended: none (every probe failed)")
    return "\n".join(lines)


def run_layouts(cfg: config_lib.Config, plan: Plan, config: str, overrides: list[str]) -> bool:
    """Probe every layout of this machine's cores and print the table and the recommendation; False if all failed."""
    cores = usable_cores()
    chosen, skipped = layouts(cores, cfg.train.micro_batch_size, global_batch(cfg, plan.world_size))
    results = probe_layouts(config, overrides, chosen)
    best = fastest(results)
    command = launch_command(config, overrides, best, cfg.train.grad_accum_steps) if best else ""
    print(render_layouts(cfg, plan, cores, skipped, results, best, command), flush=True)
    return best is not None


def planned_precision(requested: str, gpu: bool) -> precision_lib.Choice:
    """train.precision resolved as the Trainer would here; for a GPU cluster planned from a machine without one
    (--gpu-mem-gb), auto is bf16: fp16, auto's choice on GPUs without bf16, takes the same memory."""
    import torch
    from deepspeed.accelerator import get_accelerator

    if requested == "auto" and gpu and not torch.cuda.is_available():
        return precision_lib.Choice("bf16", requested, "auto on a GPU cluster: bf16 (fp16 where the GPUs lack "
                                                       "bf16, same memory)")
    return precision_lib.resolve(requested, torch.device(get_accelerator().current_device_name()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--world-size", type=int, help="data-parallel ranks of the planned run (default: the GPUs "
                        "of this machine, or 1)")
    parser.add_argument("--gpu-mem-gb", type=float, help="memory of one GPU of the target cluster, GB (plans for "
                        "GPUs: flash attention, CUDA reserve) ")
    parser.add_argument("--probe", action="store_true", help=f"also train {PROBE_STEPS} steps here and compare")
    parser.add_argument("--probe-nproc", type=int, help="ranks of the probe (default: the world size, at most "
                        "this machine's GPUs when it has any)")
    parser.add_argument("--probe-layouts", action="store_true", help="CPU only: also probe every split of this "
                        f"machine's cores into N ranks x cores/N threads (at most {MAX_LAYOUTS}) at the configured "
                        "global batch and recommend the fastest")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    args = parser.parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.probe_layouts and args.gpu_mem_gb is not None:
        parser.error("--probe-layouts measures this CPU machine; it does not go with --gpu-mem-gb (a plan for GPUs)")
    try:
        import torch

        if args.probe_layouts and torch.cuda.is_available():
            print(f"error: --probe-layouts is for CPU-only machines; this one has {torch.cuda.device_count()} CUDA "
                  "GPU(s), where a run takes one rank per GPU: use --probe", file=sys.stderr)
            return exit_codes.USAGE
        world = args.world_size or max(1, torch.cuda.device_count())
        gpu = args.gpu_mem_gb is not None or torch.cuda.is_available()
        cfg = config_lib.load(args.config, args.overrides)
        plan = estimate(cfg, world, gpu=gpu)
        local = min(world, os.cpu_count() or 1)
        budget, source = memory_budget(args.gpu_mem_gb, local)
        print(render(cfg, plan, budget, source), flush=True)
        if args.probe:
            nproc = args.probe_nproc or (min(world, torch.cuda.device_count()) if torch.cuda.is_available() else world)
            print(render_probe(cfg, plan, probe(args.config, args.overrides, nproc)), flush=True)
        if args.probe_layouts and not run_layouts(cfg, plan, args.config, args.overrides):
            raise RunError("every layout's probe failed (their output is above, on stderr)")
    except (RunError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    return exit_codes.OK
