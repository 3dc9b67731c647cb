"""Command line: `python -m data_prep {demo-corpus,tokenizer,tokenize,merge,blend,verify} ...`.

A DataError (bad input, bad directory) is printed as `error: <message>` with exit status 2 and no traceback;
`verify` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep.errors import DataError


def _slurm_count() -> int:
    return int(os.environ.get("SLURM_ARRAY_TASK_COUNT") or 1)


def _slurm_id() -> int:
    if os.environ.get("SLURM_ARRAY_TASK_ID") is None:
        return 0
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN") or 0)


def add_input_args(p: argparse.ArgumentParser) -> None:
    """The input options shared by `tokenizer` and `tokenize` (both read the corpus the same way)."""
    p.add_argument("--input", nargs="+", required=True,
                   help="input files, directories or quoted globs: .jsonl/.jsonl.gz/.jsonl.zst (one JSON object per "
                        "line), .parquet, .csv (header row), .txt (see --txt-mode); hf:DIR for a Hugging Face "
                        "dataset saved with save_to_disk, hf:NAME[:CONFIG] for one in the local datasets cache")
    p.add_argument("--hf-split", action="append", default=None, metavar="SPLIT",
                   help="hf: inputs: read this split (repeat or comma-separate for several; default: the only split, "
                        "else train)")
    p.add_argument("--text-field", action="append", default=None,
                   help="field/column holding the text (default: text); repeat to join several with --field-join")
    p.add_argument("--field-join", default="\n\n", help="string joining several --text-field values (default: "
                                                         "a blank line)")
    p.add_argument("--txt-mode", choices=("file", "paragraph"), default="file",
                   help=".txt inputs: one document per file (default) or per blank-line separated block")
    p.add_argument("--max-record-mb", type=float, default=16.0,
                   help="a record (jsonl line, txt document, csv field, parquet value) over this many MiB is a bad "
                        "record (default 16; tokenizing one takes ~150x its size in memory)")


def _hf_splits(args: argparse.Namespace) -> list[str] | None:
    """--hf-split values, repeated and/or comma-separated, or None."""
    names = [n.strip() for value in args.hf_split or [] for n in value.split(",") if n.strip()]
    return names or None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep",
                                     description="Corpus -> token shards + manifest.json, with a Hugging Face "
                                                 "tokenizer (or a byte-level BPE tokenizer trained here).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="write a jsonl corpus from the Python standard library's source")
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--max-mb", type=float, default=8.0, help="stop after this many MB of text (default 8)")
    p.add_argument("--kind", choices=("text", "sft", "classification", "sentiment"), default="text",
                   help="text: source files (default); sft: docstring -> definition pairs; classification: "
                        "docstrings labelled function or class; sentiment: 1,200 short movie reviews labelled pos "
                        "or neg")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer and save a HuggingFace tokenizer dir")
    add_input_args(p)
    p.add_argument("--output", required=True, help="tokenizer directory to write (replaced if it exists)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    p.add_argument("--model-max-length", type=int, default=2048,
                   help="model_max_length recorded in tokenizer_config.json (default 2048)")

    p = sub.add_parser("tokenize", help="tokenize a corpus into shards + manifest.json")
    add_input_args(p)
    p.add_argument("--tokenizer", required=True, help="HuggingFace tokenizer dir (with tokenizer.json)")
    p.add_argument("--output", required=True, help="shard directory to write (previous shards in it are replaced)")
    p.add_argument("--eos-token", default=None,
                   help="token that ends each document in the shards (default: the tokenizer's eos_token, else "
                        "<|endoftext|>, else its sep_token); for a tokenizer that names none")
    p.add_argument("--record-kind", choices=("text", "sft", "classification"), default="text",
                   help="text: pretraining stream (default); sft: prompt/response or chat messages with a loss mask; "
                        "classification: text (+ text pair) and a label")
    p.add_argument("--prompt-field", default="prompt", help="sft: field holding the prompt (default: prompt)")
    p.add_argument("--response-field", default="response", help="sft: field holding the response (default: response)")
    p.add_argument("--messages-field", default=None,
                   help="sft: field holding chat messages [{role, content}], rendered with the tokenizer's "
                        "chat_template (instead of --prompt-field/--response-field)")
    p.add_argument("--text-pair-field", default=None, help="classification: field holding the second text")
    p.add_argument("--label-field", default="label", help="classification: field holding the label (default: label)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classification: integer labels are class ids in [0, N) (without it or --labels, integer "
                        "labels must be below 10,000)")
    p.add_argument("--labels", default=None,
                   help="classification: comma-separated label set in id order (default: the sorted labels found)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="error (default): stop at the first malformed record, naming file and line; skip: skip and "
                        "count them by reason in the manifest")
    p.add_argument("--splits-from-input", action="store_true",
                   help="hf: inputs: their train / validation / test splits become our train / val / test splits "
                        "(instead of --val-*/--test-*)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the val split")
    p.add_argument("--val-count", type=int, default=0, help="number of documents for the val split")
    p.add_argument("--test-fraction", type=float, default=0.0, help="fraction of documents for the test split")
    p.add_argument("--test-count", type=int, default=0, help="number of documents for the test split")
    p.add_argument("--shard-tokens", type=int, default=50_000_000,
                   help="start a new shard once one holds this many tokens (default 50_000_000)")
    p.add_argument("--batch-size", type=int, default=1024, help="documents encoded per batch (default 1024)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1); output is identical "
                                                          "for any value")
    p.add_argument("--chunk-mb", type=float, default=None,
                   help="work unit size in MiB, the granularity of parallelism and of resuming (default: input "
                        "size / 16, between 1 and 16)")
    p.add_argument("--num-tasks", type=int, default=_slurm_count(),
                   help="split the work over this many array tasks (default: $SLURM_ARRAY_TASK_COUNT or 1); "
                        "then run `merge`")
    p.add_argument("--task-id", type=int, default=_slurm_id(),
                   help="this task's index in [0, --num-tasks) (default: $SLURM_ARRAY_TASK_ID - "
                        "$SLURM_ARRAY_TASK_MIN, or 0)")

    p = sub.add_parser("merge", help="assemble the parts written by `tokenize --num-tasks K` into shards + manifest")
    p.add_argument("directory", nargs="?", help="the --output of the tokenize tasks")
    p.add_argument("--output", dest="output", default=None, help="same as DIRECTORY")

    p = sub.add_parser("blend", help="validate a blend spec (path: weight lines) and report realised proportions")
    p.add_argument("spec", help="blend spec file: one `shard_dir: weight` per line (or a JSON object)")
    p.add_argument("--split", default="train", help="split to sample (default train)")
    p.add_argument("--seq-len", type=int, default=2048, help="window length for text shards (default 2048)")
    p.add_argument("--samples", type=int, default=1_000_000, help="samples to draw for the report (default 1e6)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("verify", help="re-check every shard's size and sha256 against manifest.json")
    p.add_argument("directory", help="shard directory (the --output of tokenize)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Subcommand modules are imported on demand so `verify` or `demo-corpus` start fast.
    if args.command == "demo-corpus":
        from data_prep.demo_corpus import write_demo_corpus

        write_demo_corpus(args.output, args.max_mb, args.kind)
    elif args.command == "tokenizer":
        from data_prep.readers import expand_inputs
        from data_prep.train_tokenizer import train_tokenizer

        train_tokenizer(expand_inputs(args.input, _hf_splits(args)), args.output, args.vocab_size,
                        args.text_field or ["text"], args.model_max_length, txt_mode=args.txt_mode,
                        field_join=args.field_join, max_record_mb=args.max_record_mb)
    elif args.command == "tokenize":
        from data_prep.pipeline import tokenize_corpus
        from data_prep.records import RecordSpec

        spec = RecordSpec(kind=args.record_kind, text_fields=tuple(args.text_field or ["text"]),
                          field_join=args.field_join, prompt_field=args.prompt_field,
                          response_field=args.response_field, messages_field=args.messages_field,
                          text_pair_field=args.text_pair_field, label_field=args.label_field,
                          labels=tuple(x.strip() for x in args.labels.split(",")) if args.labels is not None
                          else None, num_labels=args.num_labels, max_record_mb=args.max_record_mb,
                          txt_mode=args.txt_mode, on_bad=args.on_bad_record)
        tokenize_corpus(args.input, args.tokenizer, args.output, val_fraction=args.val_fraction,
                        shard_tokens=args.shard_tokens, batch_size=args.batch_size, spec=spec,
                        val_count=args.val_count, test_fraction=args.test_fraction, test_count=args.test_count,
                        workers=args.workers, chunk_mb=args.chunk_mb, num_tasks=args.num_tasks, task_id=args.task_id,
                        hf_splits=_hf_splits(args), splits_from_input=args.splits_from_input,
                        eos_token=args.eos_token)
    elif args.command == "merge":
        from data_prep.pipeline import merge

        directory = args.directory or args.output
        if directory is None:
            raise DataError("merge: give the shard directory (the --output of the tokenize tasks)")
        merge(directory)
    elif args.command == "blend":
        from data_prep.blend import report

        print(report(args.spec, args.split, args.seq_len, args.samples, args.seed))
    elif args.command == "verify":
        from data_prep.verify import verify_shards

        problems, manifest = verify_shards(args.directory)
        if problems:
            for line in problems:
                print(line)
            return 1
        splits = manifest["splits"]
        print(f"OK {args.directory}: " + ", ".join(
            f"{name} {len(s['shards'])} shards / {s['num_tokens']:,} tokens" for name, s in splits.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written under a temporary name and renamed when complete; the failed one was removed.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: no space left on device{where} ({exc.strerror}); nothing half-written was left: free space "
              "or choose another output, then re-run the same command (finished work is kept)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
