"""Training throughput of our trainer (`train/main.py`) against the Hugging Face `Trainer` on the same DeepSpeed
config, model, data and hyper-parameters.

    python bench/train_throughput.py [--steps 20] [--warmup 3] [--stages 2] [--ranks 2] [--precision auto]

For each ZeRO stage it
  1. writes random-token shards once (numpy, fixed seed, the vocabulary of --model) with `data_prep.shards.ShardWriter`;
  2. runs `deepspeed --num_gpus R train/main.py --config configs/quickstart.yaml <overrides>` (DeepSpeed's launcher
     as `python -m deepspeed.launcher.runner`) with log_every=1 and reads the per-step timestamps and losses from
     `metrics.jsonl`;
  3. builds the DeepSpeed config that run used (`train.config.load` + `train.ds_config.build`) and the model's
     transformers config (`train.model.build_hf_config`), writes both to files and runs
     `deepspeed --num_gpus R bench/hf_trainer_baseline.py` on them, which records a `perf_counter()` and the loss
     per step;
  4. tokens/s = tokens of the steps after `--warmup` / wall time from the end of step `warmup` to the end of the
     last step (the same definition for both; the final checkpoint our trainer writes is outside that window).

--precision auto (the default) is resolved once here, as `train.precision: auto` would be on this machine
(`train.precision.resolve`: bf16 on a GPU with bf16, else fp16; on CPU bf16 only where it is fast, else fp32), and
both trainers then run in that precision; MFU is against the matmul peak of that precision.

Both runs get the same OMP_NUM_THREADS (cores // ranks unless --threads is given). Prints the commands it ran, a
table (stage, ours, HF, ratio, MFU) and each run's first and last loss, and the per-step loss gap between ours and HF
(with --seed-spread, also between two of our own runs with different seeds). Run directories live under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402

BASE_CONFIG = "configs/quickstart.yaml"
# The models the bench can train, each from a transformers config, with the vocabulary of its random token ids.
# gpt2-14m is the CPU reference (bench/README.md); llama-1b is what bench/gpu_check.sh trains on a GPU; llama-tiny
# runs the same code path as llama-1b in seconds (a smoke test of the Llama path on CPU).
MODELS = {
    "gpt2-14m": {"model_type": "gpt2", "vocab": 8192, "describe": "GPT-2 6x384 (6 heads)",
                 "hf_config": "{{n_layer: 6, n_embd: 384, n_head: 6, n_positions: {positions}}}"},
    "llama-1b": {"model_type": "llama", "vocab": 32000, "describe": "Llama 18x2048 (16 heads, MLP 5632)",
                 "hf_config": "{{hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 18, "
                              "num_attention_heads: 16, num_key_value_heads: 16, "
                              "max_position_embeddings: {positions}}}"},
    "llama-tiny": {"model_type": "llama", "vocab": 512, "describe": "Llama 2x128 (4 heads, MLP 344)",
                   "hf_config": "{{hidden_size: 128, intermediate_size: 344, num_hidden_layers: 2, "
                                "num_attention_heads: 4, num_key_value_heads: 4, "
                                "max_position_embeddings: {positions}}}"},
}
EOS = 0
DATA_SEED = 0
RUN_SEED = 1234  # run.seed of our runs and --seed of the baseline; --seed-spread's second run takes RUN_SEED + 1
# DeepSpeed's launcher (what the `deepspeed` command runs) from this interpreter: also where DeepSpeed was installed
# with `pip --target` and has no command on the PATH (bench/gpu_check.sh on a GPU machine without a package index).
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]


def make_random_shards(out_dir: Path, num_tokens: int, vocab: int, seed: int = DATA_SEED) -> Path:
    """A shard directory of `num_tokens` uniformly random token ids in [1, vocab), cut into documents of random
    length each ending in EOS, written with data_prep's own writer and manifest. Reused if already there."""
    from data_prep.manifest import build_manifest, load_manifest, write_manifest
    from data_prep.shards import ShardWriter, dtype_for_vocab

    if (out_dir / "manifest.json").is_file():
        manifest = load_manifest(out_dir)
        if (manifest.get("counts", {}).get("bench_seed") == seed and manifest["tokenizer"]["vocab_size"] == vocab
                and manifest["splits"]["train"]["num_tokens"] >= num_tokens):
            return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    # No real tokenizer made these ids; a directory describing that stands in for it (the manifest fingerprints it).
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "README.txt").write_text(f"No tokenizer: uniformly random ids in [1, {vocab}), eos {EOS}, "
                                              f"numpy seed {seed}; written by bench/train_throughput.py\n")
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(int(rng.integers(256, 4096)))
    lengths = np.array(lengths, dtype=np.int64)
    tokens = rng.integers(1, vocab, size=int(lengths.sum()), dtype=np.uint16)
    tokens[np.cumsum(lengths) - 1] = EOS
    dtype = dtype_for_vocab(vocab)
    writer = ShardWriter(out_dir, "train", dtype, shard_tokens=1 << 22)
    writer.add(tokens, lengths)
    entries = writer.close()
    manifest = build_manifest(tokenizer_dir=tokenizer_dir, vocab_size=vocab,
                              special_ids={"eos_id": EOS, "bos_id": EOS, "pad_id": None}, backend="random",
                              dtype=dtype.name, splits={"train": entries}, inputs=[], val_fraction=0.0,
                              counts={"bench_seed": seed, "documents": len(lengths)})
    write_manifest(out_dir, manifest)
    return out_dir


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: int) -> float:
    """Run `cmd` from the project root with output to `log_path`; on failure print the log's tail and exit."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log_path.read_text()[-6000:]
        sys.exit(f"error: command failed with exit code {proc.returncode} (log {log_path}):\n{tail}")
    return time.perf_counter() - start


def throughput(times: dict[int, float], steps: int, warmup: int, tokens_per_step: int) -> float:
    """Tokens per second over steps warmup+1 .. steps, timed from the end of step `warmup` to the end of `steps`."""
    missing = [s for s in (warmup, steps) if s not in times]
    if missing:
        raise SystemExit(f"error: no timestamp for step(s) {missing}; got steps {sorted(times)}")
    return (steps - warmup) * tokens_per_step / (times[steps] - times[warmup])


def median_step_throughput(times: dict[int, float], steps: int, warmup: int, tokens_per_step: int) -> float:
    """Tokens per second of the median step among warmup+1 .. steps: on a shared machine, steps slowed by other
    work move the mean but not this."""
    durations = sorted(times[s] - times[s - 1] for s in range(warmup + 1, steps + 1))
    return tokens_per_step / durations[len(durations) // 2]


def shell_join(cmd: list[str], env_prefix: str) -> str:
    import shlex

    return env_prefix + " ".join(shlex.quote(str(c)) for c in cmd)


def ours_overrides(args, stage: int, data_dir: Path, run_root: Path, accum: int, name: str,
                   seed: int = RUN_SEED) -> list[str]:
    # args.precision is the resolved one (main), so that ours and the HF baseline train in the same precision.
    """The run-config overrides of our trainer's run (the HF baseline derives its inputs from the same config)."""
    return [
        f"model.model_type={MODELS[args.model]['model_type']}",
        f"model.hf_config={MODELS[args.model]['hf_config'].format(positions=max(512, args.seq_len))}",
        f"model.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"data.path={data_dir}", f"data.seq_len={args.seq_len}", 'data.val_split=""',
        "optim.lr=3.0e-4", "optim.min_lr=3.0e-4", "optim.warmup_steps=0",  # constant lr, like HF "constant"
        "optim.betas=[0.9, 0.95]", "optim.weight_decay=0.1", "optim.eps=1.0e-8", "optim.grad_clip=1.0",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
        f"train.grad_accum_steps={accum}", f"train.precision={args.precision}",
        f"train.deepspeed_config=ds_configs/zero{stage}.json",
        "train.log_every=1", "eval.every=0", "checkpoint.every=0",
        f"run.output_dir={run_root}", f"run.name={name}", "run.resume=never", f"run.seed={seed}",
    ]


def run_ours(args, overrides: list[str], run_dir: Path, ranks: int, threads: int, log_path: Path,
             tokens_per_step: int, label: str) -> dict:
    """Train with train/main.py; tokens/s, first/last loss and rank 0's data-loader wait share from metrics.jsonl."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "train/main.py", "--config", BASE_CONFIG, *overrides]
    print(f"\n[{label}] ours: {shell_join(cmd, f'OMP_NUM_THREADS={threads} ')}", flush=True)
    wall = run_logged(cmd, env, log_path, args.timeout)
    from train import run_dir as layout

    records = [json.loads(line) for line in (run_dir / layout.METRICS).read_text().splitlines()]
    train = {r["step"]: r for r in records if "train/loss" in r}
    timed = [train[s] for s in range(args.warmup + 1, args.steps + 1)]
    times = {s: r["time"] for s, r in train.items()}
    result = {"tokens_per_s": throughput(times, args.steps, args.warmup, tokens_per_step),
              "median_tokens_per_s": median_step_throughput(times, args.steps, args.warmup, tokens_per_step),
              "loss": (train[1]["train/loss"], train[args.steps]["train/loss"]),
              "losses": {s: r["train/loss"] for s, r in sorted(train.items())},
              "data_wait_share": sum(r["data/wait_share"] for r in timed) / len(timed)}
    print(f"[{label}] ours: {result['tokens_per_s']:,.0f} tokens/s, loss {result['loss'][0]:.4f} -> "
          f"{result['loss'][1]:.4f}, data-loader wait {result['data_wait_share']:.2%} of the step (process wall "
          f"{wall:.0f}s, log {log_path})", flush=True)
    return result


def loss_gap(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """(max |a - b|, mean a - b, steps compared) over the steps both runs logged."""
    steps = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in steps]
    return max(abs(d) for d in diffs), sum(diffs) / len(diffs), len(steps)


def resolve_precision(threads: int, requested: str):
    """`requested` resolved as the trainer would on one rank here (`train.precision.resolve`, probing on `threads`
    threads), and the peak FLOP/s of one rank in the precision its matmuls run in (train.flops: GPU table or probe)."""
    import torch

    from train.flops import peak_flops
    from train.precision import resolve

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = resolve(requested, device)
    return choice, *peak_flops(device, choice.peak_precision)


def flops_per_token(cfg, manifest: dict) -> int:
    """Model FLOPs per trained token (train.flops, PaLM's formula; recomputation not counted)."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.flops import model_flops
    from train.model import build_hf_config

    with torch.device("meta"):  # shapes only: a 1B model is counted without allocating or initialising it
        model = AutoModelForCausalLM.from_config(build_hf_config(cfg.model, manifest["tokenizer"], cfg.data.seq_len))
    return model_flops(model, cfg.data.seq_len).flops_per_token


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tokens/s of train/ vs the HF Trainer on the same DeepSpeed config.")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the timing (default 3)")
    p.add_argument("--stages", type=int, nargs="+", default=[2], choices=[0, 1, 2, 3],
                   help="ZeRO stages to run, each with ds_configs/zero<N>.json (default 2)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (deepspeed --num_gpus) per run (default 2)")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2-14m",
                   help="the model trained, from a transformers config (default gpt2-14m, the CPU reference)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing for both trainers (default off, the HF Trainer's default and the "
                        "setting the CPU reference figures were measured in; MFU does not count the recompute)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="precision of both trainers (default auto: resolved here as train.precision: auto would be)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every rank of both runs (default: CPU cores // ranks)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="run only one of the two trainers")
    p.add_argument("--workdir", default="runs/bench_throughput",
                   help="data, run directories and logs (default runs/bench_throughput; replaced per run)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per training run (default 3600)")
    p.add_argument("--scaling", action="store_true",
                   help="also run ours on 1 rank with ranks x threads threads and grad_accum_steps = ranks (same "
                        "global batch and micro-batch) at the first stage, for the ranks-vs-threads figure")
    p.add_argument("--seed-spread", action="store_true",
                   help="also run ours with another run.seed (other dropout masks and window order) at the first "
                        "stage: the per-step loss gap between two of our own runs, against which the ours-vs-HF "
                        "gap is read")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be >= 0 and < --steps")

    from train import config as config_lib
    from train import ds_config as ds_config_lib
    from train.errors import RunError
    from train.model import build_hf_config

    workdir = (ROOT / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env_prefix = f"OMP_NUM_THREADS={threads} "
    tokens_per_step = args.micro_batch * args.ranks * args.seq_len
    # Enough windows that no window repeats within a run (plus slack for documents being cut at window ends).
    vocab = MODELS[args.model]["vocab"]
    data_dir = make_random_shards(workdir / "data", int(args.steps * tokens_per_step * 1.1) + 64 * args.seq_len, vocab)

    print(f"bench: {args.ranks} ranks, OMP_NUM_THREADS={threads} ({os.cpu_count()} CPU cores), "
          f"{MODELS[args.model]['describe']}, vocab {vocab}, seq {args.seq_len}, micro-batch {args.micro_batch}/rank, "
          f"{tokens_per_step} tokens/step, {args.steps} steps ({args.warmup} warmup), activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}, data {data_dir}", flush=True)

    manifest = json.loads((data_dir / "manifest.json").read_text())
    try:
        choice, peak, peak_source = resolve_precision(threads, args.precision)
    except RunError as exc:
        sys.exit(f"error: {exc}")
    print(f"bench: precision {choice.precision} ({choice.reason}){' ' + choice.warning if choice.warning else ''}",
          flush=True)
    args.precision = choice.precision
    print(f"bench: matmul peak {peak:.3g} FLOP/s per rank ({peak_source})", flush=True)
    fpt = None

    results = []
    for stage in args.stages:
        stage_dir = workdir / f"zero{stage}"
        overrides = ours_overrides(args, stage, data_dir, stage_dir, 1, "ours")
        cfg = config_lib.load(ROOT / BASE_CONFIG, overrides)
        fpt = fpt or flops_per_token(cfg, manifest)
        ds_config = ds_config_lib.build(cfg, args.ranks)
        stage_dir.mkdir(parents=True, exist_ok=True)
        ds_path = stage_dir / "ds_config.json"
        ds_path.write_text(json.dumps(ds_config, indent=2))
        model_dir = stage_dir / "hf_model_config"
        build_hf_config(cfg.model, manifest["tokenizer"], cfg.data.seq_len).save_pretrained(model_dir)
        row = {"stage": stage}

        if args.only in (None, "ours"):
            ours = run_ours(args, overrides, cfg.run_dir, args.ranks, threads, stage_dir / "ours.log",
                            tokens_per_step, f"zero{stage}")
            row.update(ours=ours["tokens_per_s"], ours_median=ours["median_tokens_per_s"], ours_loss=ours["loss"],
                       ours_losses=ours["losses"], ours_wait=ours["data_wait_share"])

        if args.only in (None, "hf"):
            out = stage_dir / "hf_times.json"
            out.unlink(missing_ok=True)
            o = cfg.optim
            cmd = [*DEEPSPEED, "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
                   "bench/hf_trainer_baseline.py", "--ds-config", str(ds_path), "--model-config", str(model_dir),
                   "--data", str(data_dir), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                   "--grad-accum", "1", "--steps", str(args.steps), "--lr", repr(o.lr),
                   "--betas", repr(o.betas[0]), repr(o.betas[1]), "--eps", repr(o.eps),
                   "--weight-decay", repr(o.weight_decay), "--grad-clip", repr(o.grad_clip),
                   "--precision", cfg.train.precision,
                   "--activation-checkpointing" if args.activation_checkpointing else "--no-activation-checkpointing",
                   "--seed", str(cfg.run.seed), "--output-dir", str(stage_dir / "hf"), "--out", str(out)]
            print(f"\n[zero{stage}] hf:   {shell_join(cmd, env_prefix)}", flush=True)
            wall = run_logged(cmd, env, stage_dir / "hf.log", args.timeout)
            hf = json.loads(out.read_text())
            if not hf["deepspeed_enabled"] or hf["engine_zero_stage"] != stage:
                sys.exit(f"error: HF run did not train under DeepSpeed ZeRO-{stage}: {hf['engine_class']}, "
                         f"stage {hf['engine_zero_stage']}")
            if (hf["tokens_per_step"] != tokens_per_step
                    or hf["engine_train_batch_size"] != ds_config["train_batch_size"]):
                sys.exit(f"error: HF run used {hf['tokens_per_step']} tokens/step (engine train_batch_size "
                         f"{hf['engine_train_batch_size']}), ours {tokens_per_step} ({ds_config['train_batch_size']})")
            if ((hf["engine_bf16"], hf["engine_fp16"]) != (cfg.train.precision == "bf16", cfg.train.precision == "fp16")
                    or hf["engine_gradient_clipping"] != o.grad_clip):
                sys.exit(f"error: HF engine has bf16={hf['engine_bf16']}, fp16={hf['engine_fp16']}, "
                         f"gradient_clipping={hf['engine_gradient_clipping']}; the run config says "
                         f"{cfg.train.precision}, {o.grad_clip}")
            if hf["ds_config_changes"]:
                print(f"[zero{stage}] hf:   note: HF changed these DeepSpeed config keys (ours -> HF's): "
                      f"{json.dumps(hf['ds_config_changes'])}", flush=True)
            times = {int(k): v for k, v in hf["step_end"].items()}
            row["hf"] = throughput(times, args.steps, args.warmup, tokens_per_step)
            row["hf_median"] = median_step_throughput(times, args.steps, args.warmup, tokens_per_step)
            row["hf_loss"] = (hf["loss"]["1"], hf["loss"][str(args.steps)])
            row["hf_losses"] = {int(k): v for k, v in hf["loss"].items()}
            print(f"[zero{stage}] hf:   {row['hf']:,.0f} tokens/s, loss {row['hf_loss'][0]:.4f} -> "
                  f"{row['hf_loss'][1]:.4f} ({hf['engine_class']} ZeRO-{hf['engine_zero_stage']}, "
                  f"bf16 {hf['engine_bf16']}, fp16 {hf['engine_fp16']}, "
                  f"{hf['engine_optimizer']} over {hf['base_optimizer']}, "
                  f"OMP_NUM_THREADS={hf['omp_num_threads']}, torch threads {hf['torch_threads']}; "
                  f"process wall {wall:.0f}s, log {stage_dir / 'hf.log'})", flush=True)
        results.append(row)

    def extra_ours_run(name: str, label: str, ranks: int, threads: int, accum: int, seed: int = RUN_SEED) -> dict:
        """One more run of ours at the first stage, beside its main run (for --scaling and --seed-spread)."""
        stage_dir = workdir / f"zero{args.stages[0]}"
        overrides = ours_overrides(args, args.stages[0], data_dir, stage_dir, accum, name, seed=seed)
        return run_ours(args, overrides, config_lib.load(ROOT / BASE_CONFIG, overrides).run_dir, ranks, threads,
                        stage_dir / f"{name}.log", tokens_per_step, f"zero{args.stages[0]} {label}")

    scaling = spread = None
    if args.scaling and args.only in (None, "ours"):
        one_rank = extra_ours_run("ours_1rank", "scaling", 1, threads * args.ranks, accum=args.ranks)
        scaling = {"stage": args.stages[0], "one_rank": one_rank["tokens_per_s"], "ranks": results[0].get("ours")}
    if args.seed_spread and args.only in (None, "ours"):
        other = extra_ours_run("ours_seed2", "seed spread", args.ranks, threads, accum=1, seed=RUN_SEED + 1)
        spread = {"stage": args.stages[0], "losses": other["losses"],
                  "gap": loss_gap(other["losses"], results[0]["ours_losses"])}

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    def mfu(tokens_per_s, ranks=args.ranks):
        return tokens_per_s / ranks * fpt / peak if tokens_per_s else None

    print(f"\nTokens/s over steps {args.warmup + 1}..{args.steps} ({args.steps - args.warmup} steps x "
          f"{tokens_per_step} tokens), {args.ranks} ranks, OMP_NUM_THREADS={threads}, {args.precision}; MFU = tokens/s per rank x "
          f"{fpt / 1e6:.1f} MFLOP/token / {peak:.3g} FLOP/s ({peak_source}); wait = our data-loader share of the "
          "step:")
    header = (f"{'stage':>5} | {'ours tok/s':>11} | {'HF tok/s':>11} | {'ours/HF':>7} | {'ours MFU':>8} | "
              f"{'HF MFU':>7} | {'wait':>6} | {'ours loss first->last':>22} | {'HF loss first->last':>22}")
    print(header)
    print("-" * len(header))
    for row in results:
        ours, hf = row.get("ours"), row.get("hf")
        ratio = ours / hf if ours and hf else None
        ol = row.get("ours_loss")
        hl = row.get("hf_loss")
        ol = f"{ol[0]:.4f} -> {ol[1]:.4f}" if ol else "-"
        hl = f"{hl[0]:.4f} -> {hl[1]:.4f}" if hl else "-"
        row.update(ours_mfu=mfu(ours), hf_mfu=mfu(hf))
        print(f"{row['stage']:>5} | {fmt(ours, ',.0f'):>11} | {fmt(hf, ',.0f'):>11} | {fmt(ratio, '.3f'):>7} | "
              f"{fmt(row['ours_mfu'], '.1%'):>8} | {fmt(row['hf_mfu'], '.1%'):>7} | "
              f"{fmt(row.get('ours_wait'), '.2%'):>6} | {ol:>22} | {hl:>22}")
    for row in results:
        ours, hf = row.get("ours_median"), row.get("hf_median")
        print(f"ZeRO-{row['stage']} median step (robust to other work on a shared machine): ours "
              f"{fmt(ours, ',.0f')}, HF {fmt(hf, ',.0f')} tokens/s, ours/HF "
              f"{fmt(ours / hf if ours and hf else None, '.3f')}")
    for row in results:
        if row.get("ours_losses") and row.get("hf_losses"):
            row["loss_gap"] = loss_gap(row["ours_losses"], row["hf_losses"])
            print(f"ZeRO-{row['stage']} loss, ours - HF per step over {row['loss_gap'][2]} steps: max |diff| "
                  f"{row['loss_gap'][0]:.4f}, mean diff {row['loss_gap'][1]:+.4f}")
    if spread:
        print(f"ZeRO-{spread['stage']} loss, ours (run.seed {RUN_SEED + 1}) - ours ({RUN_SEED}) per step over "
              f"{spread['gap'][2]} "
              f"steps: max |diff| {spread['gap'][0]:.4f}, mean diff {spread['gap'][1]:+.4f} (the spread between two "
              "of our own runs)")
    if scaling:
        ratio = scaling["ranks"] / scaling["one_rank"] if scaling["ranks"] else None
        print(f"\nScaling (ours, ZeRO-{scaling['stage']}, global batch {tokens_per_step} tokens): 1 rank x "
              f"{threads * args.ranks} threads {scaling['one_rank']:,.0f} tokens/s (MFU "
              f"{fmt(mfu(scaling['one_rank']), '.1%')} of {args.ranks} x the {threads}-thread peak), "
              f"{args.ranks} ranks x {threads} threads {fmt(scaling['ranks'], ',.0f')} tokens/s; ranks/threads "
              f"{fmt(ratio, '.3f')}")
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "threads": threads,
                                                      "tokens_per_step": tokens_per_step, "peak_flops": peak,
                                                      "precision": choice.as_dict(),
                                                      "peak_source": peak_source, "flops_per_token": fpt,
                                                      "results": results, "scaling": scaling,
                                                      "seed_spread": spread},
                                                     indent=2))
    print(f"\n(written to {workdir / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
