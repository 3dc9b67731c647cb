"""Where `data.length_grouping` pays: padding and training speed of sft with and without it, measured in one run.

    python bench/length_grouping.py [--group N] [--micro-batch 16] [--accum 1] [--ranks 1] [--warmup 10] [--timed N]

Data (no download): `python -m data_prep demo-corpus --kind sft --max-mb 100` (prompt = the first paragraph of a
standard-library docstring, response = the def line: lengths from ~10 to over 200 tokens), a 4,096-token byte-level
BPE tokenizer trained on it (`data_prep tokenizer`), sft shards with a 64-example val split (`data_prep tokenize
--record-kind sft --val-count 64`).

Both variants are configs/sft_full.yaml with the same overrides (a tiny GPT-2 from scratch: 4 layers, d_model 256,
4 heads, seq_len 256; task.sft_packing=false, so every example is its own row; micro-batch 16, accumulation 1,
1 rank by default; no validation, test split or periodic checkpoints) except data.length_grouping: 0 (plain) or
`--group` (grouped; default 50 x the global batch).

(1) Padding, exact, no timing: one epoch of the training split as the run would draw it, from `open_run_data` of
    each variant's config (the real GlobalBatchSampler and Documents of train/data.py), every rank's micro-batches
    built with `Documents.model_batch`: the token slots they hold once padded to their longest row, and the share of
    those slots that are real tokens.
(2) Training time: `python train/main.py` (one rank, no launcher; DeepSpeed's launcher for --ranks > 1) of each
    variant for warmup + timed steps, log_every=1. From the timestamps of metrics.jsonl over the timed steps:
    seconds per step and real (non-pad) tokens per second, and the ratio grouped / plain. Before each run the bench
    waits (up to --load-wait seconds) for the 1-minute load average to fall to --max-load, and prints the load.

Also printed: the CPU (lscpu model name, avx512_bf16) and the precision the runs resolved (train.precision: auto).
Results: <workdir>/results.json; data, run directories and logs next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import contention, cpu_description, free_port, run_logged, wait_for_quiet  # noqa: E402

CONFIG = "configs/sft_full.yaml"
MODEL = "{n_layer: 4, n_embd: 256, n_head: 4, n_positions: 256}"
SEQ_LEN = 256
VAL_COUNT = 64


# ---------------------------------------------------------------------------------------------------------- data
def prepare_data(args) -> Path:
    """The sft corpus, its tokenizer and shards under the workdir (rebuilt every run: ~15 s); the shard directory."""
    w = args.workdir
    corpus, tokenizer, shards = w / "sft.jsonl", w / "tok", w / "shards"
    steps = {
        "demo_corpus": ["demo-corpus", "--kind", "sft", "--output", corpus, "--max-mb", "100"],
        # The records have prompt and response fields, no text field: the tokenizer learns from both.
        "tokenizer": ["tokenizer", "--input", corpus, "--text-field", "prompt", "--text-field", "response",
                      "--vocab-size", "4096", "--output", tokenizer],
        "tokenize": ["tokenize", "--input", corpus, "--tokenizer", tokenizer, "--output", shards, "--record-kind",
                     "sft", "--val-count", str(VAL_COUNT)],
    }
    for name, cmd in steps.items():
        run_logged([sys.executable, "-m", "data_prep", *map(str, cmd)], dict(os.environ), w / f"{name}.log",
                   args.timeout)
    return shards


def variant_overrides(args, shards: Path, name: str, grouping: int) -> list[str]:
    """The command-line overrides of one variant; the two differ in run.name and data.length_grouping only."""
    return [f"run.output_dir={args.workdir / 'runs'}", f"run.name={name}", "run.resume=never",
            "model.init=scratch", "model.path=", f"model.hf_config={MODEL}",
            f"data.path={shards}", f"data.seq_len={SEQ_LEN}", "data.val_split=", "data.test_split=",
            f"data.length_grouping={grouping}", "task.sft_packing=false",
            # The recipe picks its best checkpoint on val/loss and stops early on it: no validation here.
            "eval.best_metric=", "eval.early_stopping_patience=0", "checkpoint.every=0",
            "train.epochs=0", f"train.max_steps={args.warmup + args.timed}",
            f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum_steps={args.accum}", "train.log_every=1"]


# ------------------------------------------------------------------------------------------------------- padding
def padding(overrides: list[str], ranks: int) -> dict:
    """Token slots and real tokens of one epoch's micro-batches, every rank's, as the run would build them."""
    from train import config as config_lib
    from train.data import open_run_data

    cfg = config_lib.load(ROOT / CONFIG, overrides)
    slots = real = micro_batches = 0
    for rank in range(ranks):
        data = open_run_data(cfg, rank, ranks)
        for _ in range(data.steps_per_epoch):
            for indices in data.sampler.next_step():
                batch, tokens = data.train.model_batch(indices)
                slots += batch["input_ids"].numel()  # rows x the longest row: sft_packing is off
                real += tokens
                micro_batches += 1
    return {"slots": slots, "real_tokens": real, "real_share": real / slots, "micro_batches": micro_batches,
            "examples": len(data.train), "steps_per_epoch": data.steps_per_epoch}


# ------------------------------------------------------------------------------------------------------ training
def train(args, overrides: list[str], name: str) -> dict:
    """One timed run of train/main.py; seconds per step and real tokens/s over the timed steps."""
    run_dir = args.workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    main = ["train/main.py", "--config", CONFIG, *overrides]
    if args.ranks > 1:
        main = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
                *main]
    load = wait_for_quiet(args.max_load, args.load_wait, name)
    run = run_logged([sys.executable, *main], {**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                     args.workdir / f"{name}.log", args.timeout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "train/loss" in r}
    # Each step's record is written when the step ends: the window runs from the end of the last warmup step to the
    # end of the last step, so start-up, the warmup steps and the final checkpoint are outside it.
    first, last = steps[args.warmup], steps[args.warmup + args.timed]
    seconds = last["time"] - first["time"]
    tokens = last["data/tokens_seen"] - first["data/tokens_seen"]  # padding excluded, summed over the ranks
    precision = json.loads((run_dir / "summary.json").read_text())["precision"]
    r = {"name": name, "load_before": load, "load_after": os.getloadavg()[0], "precision": precision,
         "seconds_per_step": seconds / args.timed, "real_tokens_per_s": tokens / seconds,
         "real_tokens_per_step": tokens / args.timed, "loss": (steps[1]["train/loss"], last["train/loss"]),
         "process_wall": run["wall"], "others_cpu": run["others_cpu"]}
    print(f"[{name}] {r['seconds_per_step'] * 1000:.0f} ms/step, {r['real_tokens_per_s']:,.0f} real tokens/s "
          f"({r['real_tokens_per_step']:,.0f} per step), {precision['precision']}; loss {r['loss'][0]:.3f} -> "
          f"{r['loss'][1]:.3f}; load {load:.2f} before, {r['load_after']:.2f} after; {contention(run)}", flush=True)
    return r


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=None, help="data.length_grouping of the grouped run (default 50 x "
                                                           "the global batch)")
    p.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch_size (default 16)")
    p.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps (default 1)")
    p.add_argument("--ranks", type=int, default=1, help="ranks (default 1: plain python, no launcher)")
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed window (default 10)")
    p.add_argument("--timed", type=int, default=None,
                   help="timed steps (default: one group's worth, group / global batch)")
    p.add_argument("--workdir", default="runs/bench_length_grouping",
                   help="data, run directories, logs and results.json (default runs/bench_length_grouping)")
    p.add_argument("--max-load", type=float, default=0.5, help="wait before each timed run until the 1-minute load "
                                                                "average is at most this (default 0.5)")
    p.add_argument("--load-wait", type=float, default=600, help="longest wait for that, seconds (default 600)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per command (default 1800)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warmup < 1:
        sys.exit("error: --warmup must be >= 1: the timed window starts at the end of the last warmup step")
    global_batch = args.micro_batch * args.accum * args.ranks
    args.group = args.group or 50 * global_batch
    # The grouped order runs longest to shortest inside each group, so a window of whole groups' worth of steps sees
    # every length rank once per group, as the plain order does on average; a shorter one would favour one end.
    args.timed = args.timed or max(1, args.group // global_batch)
    args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    args.workdir = (ROOT / args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench: CPU {cpu_description()}; {args.ranks} rank(s) x {args.threads} thread(s), micro-batch "
          f"{args.micro_batch}, accumulation {args.accum}: global batch {global_batch}; group {args.group}", flush=True)
    if (args.timed * global_batch) % args.group:
        print(f"bench: note: {args.timed} timed steps x {global_batch} examples is not a whole number of groups of "
              f"{args.group}: the grouped run's window over-represents some lengths", flush=True)

    shards = prepare_data(args)
    variants = {"plain": variant_overrides(args, shards, "plain", 0),
                "grouped": variant_overrides(args, shards, "grouped", args.group)}

    pad = {name: padding(o, args.ranks) for name, o in variants.items()}
    p, g = pad["plain"], pad["grouped"]
    print(f"\nPadding over one epoch of the training split ({p['examples']:,} examples, {p['steps_per_epoch']} steps, "
          f"{p['micro_batches']} micro-batches of {args.micro_batch}; each row padded to its micro-batch's longest):")
    for name, r in pad.items():
        print(f"  {name:<8} {r['slots']:>10,} token slots, {r['real_tokens']:>10,} real: {r['real_share']:.1%} real")
    print(f"  grouped / plain slots: {g['slots'] / p['slots']:.3f}", flush=True)

    runs = {name: train(args, o, name) for name, o in variants.items()}
    a, b = runs["plain"], runs["grouped"]
    print(f"\nTraining, steps {args.warmup + 1}-{args.warmup + args.timed} of each run "
          f"(precision {a['precision']['precision']}: {a['precision']['reason']}):")
    for name, r in runs.items():
        print(f"  {name:<8} {r['seconds_per_step']:.3f} s/step, {r['real_tokens_per_s']:>8,.0f} real tokens/s "
              f"(load {r['load_before']:.2f} before)")
    ratio = b["real_tokens_per_s"] / a["real_tokens_per_s"]
    print(f"  grouped / plain: real tokens/s {ratio:.2f}, s/step {b['seconds_per_step'] / a['seconds_per_step']:.2f}")

    (args.workdir / "results.json").write_text(json.dumps(
        {"cpu": cpu_description(), "global_batch": global_batch, "group": args.group, "warmup": args.warmup,
         "timed": args.timed, "padding": pad, "runs": runs, "real_tokens_per_s_ratio": ratio,
         "commands": {name: ["train/main.py", "--config", CONFIG, *o] for name, o in variants.items()}}, indent=2))
    print(f"\n(written to {args.workdir / 'results.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
