"""Batch inference with an exported model (or straight from a run directory).

    python -m train.predict MODEL_DIR --input IN.jsonl --output OUT.jsonl [--batch-size 16] [--max-new-tokens 64]
        [--device cpu|cuda] [--text-field F] [--text-pair-field F] [--prompt-field F] [--step N|best|latest]

MODEL_DIR is a directory written by `python -m train.export` (or any HF model dir with `tokenizer.json`), a LoRA
adapter exported with `--no-merge`, or a run directory (`config.yaml` + `checkpoints/`): its checkpoint (`--step`,
default latest) is exported to a temporary directory first, with `train.export`.

- Classification models (`*ForSequenceClassification`): each output line is the input record plus `label` (the
  most probable label) and `probabilities` ({label: p}). An input field that already has one of these names (a
  labelled test set's `label`) is kept as `input_label`, and the summary line reports how often the two agree.
- Causal LMs (task causal_lm / sft): the input record plus `generated`, the greedy continuation of the prompt (up to
  `--max-new-tokens` tokens, stopping at EOS), batched with left padding.

Records are encoded exactly as `data_prep` encoded the training data (`data_prep.records` extracts the fields,
`data_prep.encode` frames them as the model's tokenizer does): a classification text is the tokenizer's template
around it (`[CLS] text [SEP]`, a pair `[CLS] text [SEP] pair [SEP]` with token type ids, for BERT), or
`ids(text) + [eos]` (a pair: `ids(text) + [eos] + ids(pair) + [eos]`) for a tokenizer whose template adds nothing
(GPT-2); cut like the trainer cuts it to the run's `data.seq_len` (first seq_len-1 ids + the final one). A prompt is
what the template puts before a text (Llama's BOS) + `ids(prompt)`, with no eos. The field names default to the ones
the shards were made with (`export.json` -> `record`), else text / prompt.

Input: `.jsonl` (also `.jsonl.gz`, `.jsonl.zst`, `.csv`, `.parquet`), streamed: only one batch is in memory. The
output is written to a temporary file next to it and renamed when complete. A bad record stops the run with
`error: <file>:<line>: <reason>` and exit code 2; so does an empty prompt for a causal LM (one that encodes to no
tokens, e.g. `{"text": ""}`): there is nothing to continue. (An empty classification text is classified: it
encodes to `[eos]`, as data_prep encodes it.)

Model directories load safetensors only. The files of an export are checked against the xxh3-128 checksums in its
`export.json` before loading (a changed or damaged file is an error: export again); a run directory's checkpoint is
verified by `train.export` (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from data_prep.backend import TokenizerBackend, require_eos  # noqa: E402
from data_prep.encode import encode_input, read_framing  # noqa: E402
from data_prep.errors import DataError  # noqa: E402
from data_prep.files import atomic_file  # noqa: E402
from data_prep.manifest import tokenizer_files  # noqa: E402
from data_prep.pieces import BadRecord, Piece, ReadStats  # noqa: E402
from data_prep.readers import input_format, iter_piece, location  # noqa: E402
from data_prep.records import Extractor, RecordSpec  # noqa: E402
from train import run_dir  # noqa: E402
from train.errors import RunError  # noqa: E402


class PredictError(RunError):
    """A model directory or option predict cannot use; the message says why."""


class Predictor:
    """A loaded model + tokenizer and the encoding of records, for one model directory."""

    def __init__(self, directory: str | Path, device: str = "cpu", text_fields: list[str] | None = None,
                 text_pair_field: str | None = None, prompt_field: str | None = None, max_length: int | None = None):
        directory = Path(directory)
        self.directory = directory
        info_path = directory / "export.json"
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self._check_files(directory)
        if not tokenizer_files(directory):  # tokenizer.json, or a slow format (vocab.json + merges.txt, ...)
            raise PredictError(f"{directory}: no tokenizer files; give a directory written by `python -m "
                               "train.export` or a run directory")
        self.model, self.classify = self._load_model(directory)
        self.model.to(device).eval()
        self.device = device
        self.backend = TokenizerBackend(directory, backend="tokenizers")
        special = self.backend.special_ids
        config = self.model.config
        # An export records the eos its shards were made with (maybe named by `tokenize --eos-token`).
        self.eos = self.info["eos_id"] if "eos_id" in self.info else require_eos(directory, special)
        self.framing = read_framing(self.backend.tokenizer, self.eos)
        pad = self.info.get("pad_id")
        if pad is None:
            pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else special["pad_id"]
        self.pad = self.eos if pad is None else pad
        positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                          if getattr(config, k, None)), None)
        self.positions = positions
        self.max_length = max_length or self.info.get("seq_len") or positions
        if self.classify:
            labels = config.id2label
            self.labels = [str(labels[i]) for i in range(len(labels))]
        # The record spec the shards were made with; the CLI's field options override it.
        record = self.info.get("record")
        spec = RecordSpec.from_dict(record) if record else RecordSpec()
        spec = replace(spec, kind="classification" if self.classify else "sft", messages_field=None,
                       labels=None, on_bad="error")
        if text_fields:
            spec = replace(spec, text_fields=tuple(text_fields))
        if text_pair_field is not None:
            spec = replace(spec, text_pair_field=text_pair_field or None)
        if prompt_field:
            spec = replace(spec, prompt_field=prompt_field)
        elif not self.classify and self.info.get("task") == "causal_lm":
            spec = replace(spec, prompt_field=spec.text_fields[0])  # a causal LM continues its training text field
        self.spec = spec
        self.extractor = Extractor(spec)

    def _check_files(self, directory: Path) -> None:
        """An export's files must match the checksums its export.json records (older exports and plain HF model
        directories record none)."""
        from train.checkpoint import CHECKSUM, file_checksum

        recorded = self.info.get(CHECKSUM)
        if not isinstance(recorded, dict):
            return
        for name, digest in sorted(recorded.items()):
            path = directory / name
            if Path(name).name != name or path.is_symlink() or not path.is_file():
                raise PredictError(f"{path}: listed in export.json but missing (or not a regular file); export the "
                                   "run again")
            if file_checksum(path) != digest:
                raise PredictError(f"{path}: content differs from its checksum in export.json (changed or damaged "
                                   "since the export); export the run again")

    def _load_model(self, directory: Path):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        if (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
            adapter = json.loads((directory / "adapter_config.json").read_text())
            classify = adapter.get("task_type") == "SEQ_CLS"
            try:
                if classify:
                    from peft import AutoPeftModelForSequenceClassification

                    labels = self.info.get("labels")
                    if not labels:
                        raise PredictError(f"{directory}: a classification adapter without export.json labels; "
                                           "export it with `python -m train.export`")
                    model = AutoPeftModelForSequenceClassification.from_pretrained(
                        directory, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)}, dtype=torch.float32,
                        use_safetensors=True)
                else:
                    from peft import AutoPeftModelForCausalLM

                    model = AutoPeftModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                     use_safetensors=True)
            except (OSError, ValueError) as exc:
                raise PredictError(f"{directory}: cannot load the LoRA adapter over its base model "
                                   f"{adapter.get('base_model_name_or_path')} ({exc})") from None
            return model, classify
        if not (directory / "config.json").is_file():
            raise PredictError(f"{directory}: not a model directory (no config.json) nor a run directory "
                               f"({run_dir.CONFIG} + {run_dir.CHECKPOINTS}/)")
        config = AutoConfig.from_pretrained(directory)
        architectures = getattr(config, "architectures", None) or []
        classify = any(a.endswith("ForSequenceClassification") for a in architectures)
        if not architectures:
            classify = self.info.get("task") == "classification"
        auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
        try:
            # safetensors only: a model directory is never unpickled (a .bin file can run code when loaded)
            model = auto.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise PredictError(f"{directory}: cannot load the model ({exc})") from None
        return model, classify

    # --------------------------------------------------------------------------------------------- encoding
    def encode(self, record: dict) -> list[int]:
        """The token ids the model sees for `record`; raises BadRecord (`data_prep.pieces`) for a missing or
        non-string field."""
        return self.encode_with_types(record)[0]

    def encode_with_types(self, record: dict) -> tuple[list[int], list[int] | None]:
        """(token ids, token type ids or None where the framing has none) of `record`: `data_prep.encode`'s
        encoding of a model input; a classification input cut to `max_length` as the trainer cuts it."""
        ids, types = encode_input(self.backend, self.framing, self.extractor, record)
        if self.classify and self.max_length and len(ids) > self.max_length:  # as train.data.Documents cuts one
            ids = ids[:self.max_length - 1] + ids[-1:]
            types = types[:self.max_length - 1] + types[-1:] if types is not None else None
        return ids, types

    # --------------------------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def classify_batch(self, batch: list[list[int]], types: list[list[int] | None] | None = None
                       ) -> list[tuple[str, dict]]:
        """Right-padded with the pad id and masked, as the trainer batches classification rows; token type ids
        (0 on padding) where the framing has them."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types and types[0] is not None:
            type_ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, row_types in enumerate(types):
                type_ids[row, :len(row_types)] = torch.tensor(row_types)
            inputs["token_type_ids"] = type_ids.to(self.device)
        logits = self.model(**inputs).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        out = []
        for row in probs:
            out.append((self.labels[int(row.argmax())], {label: float(p) for label, p in zip(self.labels, row)}))
        return out

    @torch.inference_mode()
    def generate_batch(self, batch: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuation, left-padded; stops at EOS (and at max_new_tokens)."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        output = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=self.eos, pad_token_id=self.pad)
        texts = []
        for row in output[:, width:].tolist():
            if self.eos in row:
                row = row[:row.index(self.eos)]
            texts.append(self.backend.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
        """(ids, cut): a prompt whose continuation would run past the model's positions keeps its last tokens."""
        if not self.positions or len(ids) + max_new_tokens <= self.positions:
            return ids, False
        keep = self.positions - max_new_tokens
        if keep < 1:
            raise PredictError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                               f"{self.positions} positions; lower it")
        return ids[-keep:], True


def _records(path: Path, spec_fields):
    """(location, record) for every record of the input file, streamed; a bad record raises DataError."""
    if not path.is_file():
        raise PredictError(f"--input {path}: no such file")
    fmt = input_format(str(path))
    if fmt is None or fmt == "txt":
        raise PredictError(f"--input {path}: use .jsonl (or .jsonl.gz, .jsonl.zst, .csv, .parquet) records")
    piece = Piece(str(path), 0, -1)
    for number, record in iter_piece(piece, ReadStats(), spec_fields):
        if isinstance(record, BadRecord):
            raise DataError(f"{location(piece, number)}: {record.message}")
        yield (piece, number), record


def predict_file(model_dir: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 16,
                 max_new_tokens: int = 64, device: str | None = None, text_fields: list[str] | None = None,
                 text_pair_field: str | None = None, prompt_field: str | None = None, step: str | None = None,
                 max_length: int | None = None, log=print) -> dict:
    """Predict every record of `input_path` into `output_path`; returns counts."""
    model_dir, input_path, output_path = Path(model_dir), Path(input_path), Path(output_path)
    if batch_size < 1 or max_new_tokens < 1:
        raise PredictError("--batch-size and --max-new-tokens must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise PredictError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is available here; use --device cpu")
    if not model_dir.is_dir():
        raise PredictError(f"{model_dir}: no such model or run directory")
    if not input_path.is_file():
        raise PredictError(f"--input {input_path}: no such file")
    shown = str(model_dir)
    with ExitStack() as stack:
        if run_dir.is_run_dir(model_dir):
            from train.export import export_model

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="predict-export-")))
            model_dir = export_model(model_dir, tmp / "model", step=step or "latest", merge=True,
                                     log=lambda *_: None)
            shown += f" ({json.loads((model_dir / 'export.json').read_text())['checkpoint']})"
        elif step is not None:
            raise PredictError(f"--step applies to a run directory; {model_dir} is an exported model")
        predictor = Predictor(model_dir, device, text_fields, text_pair_field, prompt_field, max_length)
        fields = predictor.spec.fields()
        if not predictor.classify:
            fields = [(predictor.spec.prompt_field, "--prompt-field")]
        else:
            fields = [f for f in fields if f[1] != "--label-field"]
        output_path.parent.mkdir(parents=True, exist_ok=True)
        counts = {"records": 0, "prompts_cut": 0, "labelled": 0, "agree": 0}
        with atomic_file(output_path, "w") as out:
            pending: list[tuple[dict, list[int], list[int] | None]] = []

            def flush():
                if not pending:
                    return
                ids = [p[1] for p in pending]
                if predictor.classify:
                    results = [{"label": label, "probabilities": probs}
                               for label, probs in predictor.classify_batch(ids, [p[2] for p in pending])]
                else:
                    results = [{"generated": text} for text in predictor.generate_batch(ids, max_new_tokens)]
                for (record, _, _), result in zip(pending, results):
                    if predictor.classify and "label" in record:
                        counts["labelled"] += 1
                        counts["agree"] += str(record["label"]) == result["label"]
                    out.write(json.dumps(with_prediction(record, result), ensure_ascii=False) + "\n")
                counts["records"] += len(pending)
                pending.clear()

            for (piece, number), record in _records(input_path, fields):
                try:
                    ids, types = predictor.encode_with_types(record)
                except BadRecord as bad:
                    raise DataError(f"{location(piece, number)}: {bad.message}") from None
                if not predictor.classify:
                    if not ids:
                        raise DataError(f"{location(piece, number)}: the prompt ({predictor.spec.prompt_field}) "
                                        "is empty: it encodes to no tokens, so there is nothing to continue")
                    ids, cut = predictor.fit_prompt(ids, max_new_tokens)
                    counts["prompts_cut"] += cut
                pending.append((record, ids, types))
                if len(pending) == batch_size:
                    flush()
            flush()
    what = "classified" if predictor.classify else "generated for"
    note = (f"; {counts['prompts_cut']} prompt(s) kept only their last tokens to fit the model's "
            f"{predictor.positions} positions" if counts["prompts_cut"] else "")
    if counts["labelled"]:
        note += (f"; the predicted label equals the input's label field on {counts['agree']} of "
                 f"{counts['labelled']} ({counts['agree'] / counts['labelled']:.1%})")
    log(f"{what} {counts['records']} record(s) with {shown} on {device}: wrote {output_path}{note}")
    return counts


def with_prediction(record: dict, result: dict) -> dict:
    """The input record plus the prediction's fields; an input field of the same name (a labelled test set's
    `label`) is kept, renamed `input_<name>`."""
    out = dict(record)
    for key in result:
        if key in out:
            out[f"input_{key}"] = out.pop(key)
    out.update(result)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.predict",
                                     description="Classify records or generate continuations with an exported "
                                                 "model or a run directory.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a train.export directory, or a run directory (its checkpoint is exported first)")
    parser.add_argument("--input", required=True, help="records to predict (.jsonl, one JSON object per line)")
    parser.add_argument("--output", required=True, help="where to write the records with their predictions (.jsonl)")
    parser.add_argument("--batch-size", type=int, default=16, help="records per forward pass (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation: new tokens at most (default 64)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--text-field", action="append", default=None,
                        help="classification (and causal_lm prompts): field holding the text; default: the one the "
                             "shards were made with, else text. Repeat to join several, as data_prep does")
    parser.add_argument("--text-pair-field", default=None,
                        help="classification: field holding the second text of a pair (default: as in training)")
    parser.add_argument("--prompt-field", default=None,
                        help="generation: field holding the prompt (default: prompt for sft, the text field for "
                             "causal_lm)")
    parser.add_argument("--step", default=None,
                        help="with a run directory: the checkpoint (a step number, best or latest; default latest)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="classification: cut longer inputs to this many tokens (default: the run's "
                             "data.seq_len)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.export import quiet_libraries

    quiet_libraries()
    try:
        predict_file(args.model_dir, args.input, args.output, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, device=args.device, text_fields=args.text_field,
                     text_pair_field=args.text_pair_field, prompt_field=args.prompt_field, step=args.step,
                     max_length=args.max_length)
    except (RunError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
