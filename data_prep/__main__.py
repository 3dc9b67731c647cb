"""Command line: `python -m data_prep {demo-corpus,tokenizer,tokenize,verify} ...`.

A DataError (bad input, bad directory) is printed as `error: <message>` with exit status 2 and no traceback;
`verify` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep",
                                     description="Corpus -> byte-level BPE tokenizer -> token shards + manifest.json.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="write a jsonl corpus from the Python standard library's source")
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--max-mb", type=float, default=8.0, help="stop after this many MB of text (default 8)")

    inputs_help = "input files, directories or quoted globs (.jsonl: one JSON object per line; .txt: one document)"
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer and save a HuggingFace tokenizer dir")
    p.add_argument("--input", nargs="+", required=True, help=inputs_help)
    p.add_argument("--output", required=True, help="tokenizer directory to write (replaced if it exists)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--model-max-length", type=int, default=2048,
                   help="model_max_length recorded in tokenizer_config.json (default 2048)")

    p = sub.add_parser("tokenize", help="tokenize a corpus into shards + manifest.json")
    p.add_argument("--input", nargs="+", required=True, help=inputs_help)
    p.add_argument("--tokenizer", required=True, help="HuggingFace tokenizer dir (with tokenizer.json)")
    p.add_argument("--output", required=True, help="shard directory to write (previous shards in it are replaced)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the val split")
    p.add_argument("--shard-tokens", type=int, default=50_000_000,
                   help="start a new shard once one holds this many tokens (default 50_000_000)")
    p.add_argument("--batch-size", type=int, default=1024, help="documents encoded per batch (default 1024)")

    p = sub.add_parser("verify", help="re-check every shard's size and sha256 against manifest.json")
    p.add_argument("directory", help="shard directory (the --output of tokenize)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Subcommand modules are imported on demand so `verify` or `demo-corpus` start fast.
    if args.command == "demo-corpus":
        from data_prep.demo_corpus import write_demo_corpus

        write_demo_corpus(args.output, args.max_mb)
    elif args.command == "tokenizer":
        from data_prep.readers import expand_inputs
        from data_prep.train_tokenizer import train_tokenizer

        train_tokenizer(expand_inputs(args.input), args.output, args.vocab_size, args.text_field,
                        args.model_max_length)
    elif args.command == "tokenize":
        from data_prep.pipeline import tokenize_corpus

        tokenize_corpus(args.input, args.tokenizer, args.output, args.text_field, args.val_fraction,
                        args.shard_tokens, args.batch_size)
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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
