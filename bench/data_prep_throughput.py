"""Tokenization throughput: `python -m data_prep tokenize` end to end vs. the raw tokenizers and datasets.map.

    python bench/data_prep_throughput.py [--mb 64] [--workers 2] [--workdir /tmp/dp_bench] [--tokenizer DIR]

Builds (once, cached in --workdir) a >= --mb MiB jsonl corpus by repeating the demo corpus (Python's stdlib source)
and a byte-level BPE tokenizer trained on it, then runs each contender in its own process, on the same corpus and
tokenizer:

  ours        python -m data_prep tokenize --workers W: read -> tokenize -> shards + sha256 + manifest
  gigatoken   gigatoken encode_batch over the texts already in memory (the limit for us)
  hf          tokenizers encode_batch over the texts already in memory
  datasets    datasets load_dataset(json) -> .map(batched, num_proc=W) -> save_to_disk

It prints MB/s (UTF-8 text bytes), tokens/s and peak RSS of each ("work": the timed part only, "whole": the whole
process including interpreter start-up and imports; for raw encoders "whole" includes reading the texts), the
ratios against its targets (ours >= 0.7x gigatoken, >= 5x hf, >= 10x datasets, faster than Megatron-LM's
preprocessing), and ours again on a corpus twice as large (peak RSS must stay flat).
Ours' "work" is the whole tokenize_corpus call, start-up included (plan, backend check, gigatoken and awkward
set-up), while raw gigatoken's excludes building its tokenizer; the "marginal" line gives ours without its fixed
costs, from the 1x and 2x runs: (2x - 1x text bytes) / (2x - 1x work seconds), both runs cut into units of the same
size so that per-unit costs still count.
Peak RSS is the largest single process of the run's process tree (ru_maxrss of wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_prep.pipeline import auto_chunk_bytes  # noqa: E402  (the bench runs from a checkout)
MEGATRON_S = 8.5  # Megatron-LM preprocess_data_fast.py, whole process, 64 MiB, on the box of docs/data_prep.md

CHILD = {
    "ours": """
        import time, sys
        from data_prep.pipeline import tokenize_corpus
        t = time.perf_counter()
        m = tokenize_corpus([CORPUS], TOK, OUT, workers=WORKERS, chunk_mb=CHUNK)
        print(time.perf_counter() - t, m["splits"]["train"]["num_tokens"] - m["splits"]["train"]["num_docs"])
    """,
    "gigatoken": """
        import json, time, gigatoken, awkward as ak
        from tokenizers import Tokenizer
        texts = [json.loads(line)["text"] for line in open(CORPUS, encoding="utf-8")]
        giga = gigatoken.Tokenizer(Tokenizer.from_file(TOK + "/tokenizer.json"))
        t = time.perf_counter()
        out = giga.encode_batch(texts)
        print(time.perf_counter() - t, int(ak.sum(ak.num(out, axis=1))))
    """,
    "hf": """
        import json, time
        from tokenizers import Tokenizer
        texts = [json.loads(line)["text"] for line in open(CORPUS, encoding="utf-8")]
        tok = Tokenizer.from_file(TOK + "/tokenizer.json")
        t = time.perf_counter()
        out = tok.encode_batch(texts, add_special_tokens=False)
        print(time.perf_counter() - t, sum(len(e.ids) for e in out))
    """,
    "datasets": """
        import time, os
        os.environ["HF_DATASETS_CACHE"] = OUT + "_cache"
        from datasets import load_dataset, disable_progress_bars
        from tokenizers import Tokenizer
        disable_progress_bars()
        tok = Tokenizer.from_file(TOK + "/tokenizer.json")
        def enc(batch):
            return {"input_ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}
        t = time.perf_counter()
        ds = load_dataset("json", data_files=CORPUS, split="train", cache_dir=OUT + "_cache")
        ds = ds.map(enc, batched=True, num_proc=WORKERS, remove_columns=["text"])
        ds.save_to_disk(OUT)
        print(time.perf_counter() - t, sum(len(x) for x in ds["input_ids"]) if len(ds) < 0 else -1)
    """,
}


def run_child(name: str, corpus: Path, tok: Path, out: Path, workers: int, chunk_mb: float | None = None) -> dict:
    code = textwrap.dedent(CHILD[name]).replace("CORPUS", repr(str(corpus))).replace("TOK", repr(str(tok))) \
        .replace("OUT", repr(str(out))).replace("WORKERS", str(workers)).replace("CHUNK", repr(chunk_mb))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    _, status, usage = os.wait4(proc.pid, 0)
    whole = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
    work, tokens = stdout.split()[-2:]
    return {"work_s": float(work), "whole_s": whole, "tokens": int(tokens), "rss_mb": usage.ru_maxrss / 1024}


def build_inputs(workdir: Path, mb: int, tokenizer: str | None) -> tuple[Path, Path, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    demo = workdir / "demo.jsonl"
    if not demo.exists():
        subprocess.run([sys.executable, "-m", "data_prep", "demo-corpus", "--output", str(demo), "--max-mb", "8"],
                       cwd=ROOT, check=True)
    corpus = workdir / f"corpus_{mb}mb.jsonl"
    if not corpus.exists():
        block = demo.read_bytes()
        with open(corpus, "wb") as f:
            while f.tell() < mb << 20:
                f.write(block)
    tok = Path(tokenizer) if tokenizer else workdir / "tokenizer"
    if not tok.exists():
        subprocess.run([sys.executable, "-m", "data_prep", "tokenizer", "--input", str(demo), "--output", str(tok),
                        "--vocab-size", "8192"], cwd=ROOT, check=True)
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in open(corpus, encoding="utf-8"))
    return corpus, tok, text_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="corpus size in MiB (default 64)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "data_prep_bench"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one on the demo corpus)")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(CHILD), help="contenders to leave out")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest counts (default 1)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    corpus, tok, text_bytes = build_inputs(workdir, args.mb, args.tokenizer)
    print(f"corpus {corpus} ({corpus.stat().st_size / 2**20:.1f} MiB, {text_bytes / 1e6:.1f} MB of text), "
          f"tokenizer {tok}, workers {args.workers}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    corpus2 = workdir / f"corpus_{args.mb * 2}mb.jsonl"
    if not corpus2.exists():
        with open(corpus2, "wb") as f:
            f.write(corpus.read_bytes())
            f.write(corpus.read_bytes())
    # The 2x run uses the 1x run's work unit size, so it has twice the units: only fixed costs cancel in the marginal
    # figure. The target's three timings run interleaved (1x, 2x, gigatoken, 1x, ...) so that all three see the
    # same load on a shared box; the fastest of each counts.
    chunk_mb = auto_chunk_bytes(corpus.stat().st_size) / 2**20
    jobs = {"ours": ("ours", corpus, None), "ours_2x": ("ours", corpus2, chunk_mb),
            "gigatoken": ("gigatoken", corpus, None), "hf": ("hf", corpus, None), "datasets": ("datasets", corpus, None)}
    skip = set(args.skip) | ({"ours_2x"} if "ours" in args.skip else set())
    results = {}
    for group in (("ours", "ours_2x", "gigatoken"), ("hf",), ("datasets",)):
        group = [label for label in group if label not in skip]
        runs = {label: [] for label in group}
        for _ in range(args.repeat):
            for label in group:
                name, path, chunk = jobs[label]
                out = workdir / f"out_{label}"
                subprocess.run(["rm", "-rf", str(out), str(out) + "_cache"], check=True)
                runs[label].append(run_child(name, path, tok, out, args.workers, chunk))
        for label in group:
            results[label] = r = min(runs[label], key=lambda r: r["work_s"])
            size = text_bytes * (2 if label == "ours_2x" else 1)
            tokens = r["tokens"] if r["tokens"] >= 0 else results.get("hf", results.get("ours", r))["tokens"]
            print(f"{label:10s} work {r['work_s']:7.2f} s {size / 1e6 / r['work_s']:7.1f} MB/s "
                  f"{tokens / r['work_s'] / 1e6:6.2f} Mtok/s | whole {r['whole_s']:7.2f} s "
                  f"{size / 1e6 / r['whole_s']:7.1f} MB/s | peak RSS {r['rss_mb']:7.0f} MB", flush=True)
    if "ours" in results:
        ours = results["ours"]
        checks = []
        for name, target, key in (("gigatoken", 0.7, "work_s"), ("hf", 5.0, "work_s"), ("datasets", 10.0, "whole_s")):
            if name in results:
                ratio = results[name][key] / ours[key]
                work = results[name]["work_s"] / ours["work_s"]
                whole = results[name]["whole_s"] / ours["whole_s"]
                note = " (ours' work includes its start-up; see the marginal line)" if name == "gigatoken" else ""
                checks.append(f"ours vs {name}: {work:.2f}x (work), {whole:.2f}x (whole); target >= {target}x on "
                              f"{key[:-2]}: {'OK' if ratio >= target else 'MISSED'}{note}")
        scaled = MEGATRON_S * corpus.stat().st_size / (64 << 20)
        checks.append(f"ours whole-process {ours['whole_s']:.2f} s vs Megatron preprocess_data_fast.py "
                      f"{scaled:.1f} s (8.5 s per 64 MiB): {'OK' if ours['whole_s'] < scaled else 'MISSED'}")
        double = results["ours_2x"]
        growth = double["rss_mb"] / ours["rss_mb"] - 1
        checks.append(f"ours on 2x corpus: {double['work_s']:.2f} s, peak RSS {double['rss_mb']:.0f} MB vs "
                      f"{ours['rss_mb']:.0f} MB ({growth:+.0%}; target within 20%: {'OK' if abs(growth) <= 0.2 else 'MISSED'})")
        checks += marginal_check(ours, double, text_bytes, results.get("gigatoken"))
        print("\n".join(checks))


def marginal_check(ours: dict, double: dict, text_bytes: int, giga: dict | None) -> list[str]:
    """Ours without its fixed costs: the 2x run reads text_bytes more than the 1x run, in (t2 - t1) more seconds.
    Start-up (imports are outside both timings anyway; plan, backend check, gigatoken/awkward set-up, manifest)
    cancels; per-unit and per-byte costs do not. Raw gigatoken's "work" already excludes its start-up."""
    extra_s = double["work_s"] - ours["work_s"]
    if extra_s <= 0:
        return ["ours marginal (2x run - 1x run): not measurable (the 2x run was not slower; rerun, the box is loaded)"]
    rate = text_bytes / 1e6 / extra_s
    line = (f"ours marginal, start-up excluded ((2x - 1x) text / (2x - 1x) work time): {rate:.1f} MB/s; fixed "
            f"cost {max(ours['work_s'] - text_bytes / 1e6 / rate, 0):.2f} s")
    if giga is None:
        return [line]
    ratio = giga["work_s"] / (text_bytes / 1e6 / rate)
    return [line, f"ours marginal vs gigatoken work: {ratio:.2f}x; target >= 0.7x excluding start-up: "
                  f"{'OK' if ratio >= 0.7 else 'MISSED'}"]


if __name__ == "__main__":
    main()
