"""Record kinds: raw records -> `Example`s (the strings to encode), with the bad-record policy applied.

An Example is a list of text segments, encoded separately and concatenated (so a segment boundary is a token
boundary), plus a per-segment `trainable` flag (sft) and a label (classification):

  text            [text]                                       the --text-field value(s), joined by --field-join
  sft             [prompt, response]  trainable [0, 1]          --prompt-field / --response-field
                  [s0, a1, s2, a3, ...]                         --messages-field: the chat template rendered
                                                                turn by turn; assistant turns trainable
  classification  [text] or [text, text_pair], label            --text-field (+ --text-pair-field), --label-field

Bad records (see `BAD_REASONS`) stop the run with "<file>:<line>: <reason text>" when on_bad="error" (default) and
are counted by reason in `stats.bad_records` when on_bad="skip". Empty documents (no non-whitespace text; for sft
no non-whitespace trainable text) are dropped and counted in `stats.docs_empty_dropped`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from tokenizers import Tokenizer

from data_prep.errors import DataError
from data_prep.pieces import BadRecord, Piece, ReadStats, json_type
from data_prep.readers import DEFAULT_MAX_RECORD_MB, iter_piece, location

RECORD_KINDS = ("text", "sft", "classification")
ON_BAD = ("error", "skip")
BAD_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "csv_field_count", "missing_field", "not_a_string",
               "bad_messages", "bad_label", "unknown_label", "record_too_large")
# Integer labels are ids: the label set is 0..max. Without --labels or --num-labels they must stay below this, so
# that a stray large number (100000000) is a bad record, not a 100-million-entry label table.
MAX_UNDECLARED_LABELS = 10_000
MAX_NUM_LABELS = 1_000_000  # --num-labels / --labels: the label table is written into manifest.json


@dataclass(frozen=True)
class RecordSpec:
    kind: str = "text"
    text_fields: tuple = ("text",)
    field_join: str = "\n\n"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: tuple | None = None  # --labels: the label set in id order (else derived from the data, sorted)
    txt_mode: str = "file"
    on_bad: str = "error"
    num_labels: int | None = None  # --num-labels: integer labels are ids in [0, num_labels)
    max_record_mb: float = DEFAULT_MAX_RECORD_MB  # --max-record-mb

    def validate(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise DataError(f"--record-kind {self.kind!r}: use one of {', '.join(RECORD_KINDS)}")
        if self.on_bad not in ON_BAD:
            raise DataError(f"--on-bad-record {self.on_bad!r}: use one of {', '.join(ON_BAD)}")
        if self.txt_mode not in ("file", "paragraph"):
            raise DataError(f"--txt-mode {self.txt_mode!r}: use file or paragraph")
        if not self.text_fields:
            raise DataError("--text-field: give at least one field")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise DataError("--labels: a label is listed twice")
        if self.labels is not None and not all(isinstance(x, str) and x.strip() for x in self.labels):
            empty = next(i for i, x in enumerate(self.labels) if not (isinstance(x, str) and x.strip()))
            raise DataError(f"--labels: label {empty + 1} of {len(self.labels)} is empty; list the label names "
                            "separated by commas, e.g. --labels neg,neutral,pos")
        if self.labels is not None and len(self.labels) > MAX_NUM_LABELS:
            raise DataError(f"--labels: {len(self.labels):,} labels, more than {MAX_NUM_LABELS:,}")
        if self.num_labels is not None:
            if self.labels is not None:
                raise DataError("--num-labels and --labels: give one (--labels names the labels, --num-labels "
                                "counts integer labels)")
            if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) \
                    or not 1 <= self.num_labels <= MAX_NUM_LABELS:
                raise DataError(f"--num-labels {self.num_labels}: must be in [1, {MAX_NUM_LABELS:,}]")
        if not (isinstance(self.max_record_mb, (int, float)) and 0 < self.max_record_mb < 2048):
            raise DataError(f"--max-record-mb {self.max_record_mb}: must be > 0 and < 2048")

    @property
    def max_record_bytes(self) -> int:
        return max(1, int(self.max_record_mb * 2**20))

    def fields(self) -> list[tuple[str, str]]:
        """(field, flag) pairs a record must have."""
        if self.kind == "sft":
            if self.messages_field:
                return [(self.messages_field, "--messages-field")]
            return [(self.prompt_field, "--prompt-field"), (self.response_field, "--response-field")]
        out = [(f, "--text-field") for f in self.text_fields]
        if self.kind == "classification":
            if self.text_pair_field:
                out.append((self.text_pair_field, "--text-pair-field"))
            out.append((self.label_field, "--label-field"))
        return out

    def as_dict(self) -> dict:
        d = asdict(self)
        d["text_fields"] = list(self.text_fields)
        d["labels"] = list(self.labels) if self.labels is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecordSpec":
        d = dict(d)
        d["text_fields"] = tuple(d["text_fields"])
        d["labels"] = tuple(d["labels"]) if d.get("labels") is not None else None
        return cls(**d)


class Example(NamedTuple):
    segments: list
    trainable: list | None  # per segment (sft); None = all
    label: object  # classification: str or int; else None


class Document(NamedTuple):
    text: str
    source: str  # the input file, as expanded
    line: int  # 1-based line (jsonl, txt paragraph) or row (csv, parquet); 1 for a whole-file txt document


# ---------------------------------------------------------------------------------------------- chat templates


def chat_template(tokenizer_dir: str | Path) -> str | None:
    """The tokenizer's chat template (tokenizer_config.json `chat_template`, or chat_template.jinja), or None."""
    directory = Path(tokenizer_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def template_specials(tokenizer: Tokenizer, special_ids: dict) -> dict:
    """The special tokens a chat template may name ({{ eos_token }}, {{ bos_token }}, {{ pad_token }}; None where the
    tokenizer has none), from `data_prep.backend.special_token_ids`."""
    return {f"{key[:-3]}_token": tokenizer.id_to_token(i) if i is not None else None for key, i in special_ids.items()}


def chat_template_sha256(tokenizer_dir: str | Path) -> str | None:
    template = chat_template(tokenizer_dir)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if template is not None else None


# Qwen3's template, for one, renders an earlier assistant turn without the <think> block it gives the last one.
_NOT_TURN_BY_TURN = ("the chat template does not render this conversation turn by turn (a prefix renders "
                     "differently, as templates that drop earlier turns' reasoning do); cannot mask it: give each "
                     "assistant reply its own record (the conversation up to it, with no earlier assistant reply)")


class ChatRenderer:
    """Renders `messages` with the tokenizer's chat template (jinja2, sandboxed, as transformers does) and cuts the
    result into segments: text before each assistant turn (not trained) and the assistant turn (trained).

    Turn i's segment is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True); the template
    must render prefixes as prefixes (every common template does), otherwise the record is a bad_messages record.
    """

    def __init__(self, template: str, special: dict):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        self._template = env.from_string(template)
        self._special = special
        self._error = TemplateError

    def render(self, messages: list, add_generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._special)

    def segments(self, messages: list) -> tuple[list[str], list[bool]]:
        """The conversation as the template renders it, cut at each assistant reply (trainable) from prefix
        renderings; BadRecord where a prefix renders differently from the whole."""
        segs, train, done = [], [], ""
        try:
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prefix = self.render(messages[:i], True)
                full = self.render(messages[:i + 1], False)
                if not prefix.startswith(done) or not full.startswith(prefix):
                    raise BadRecord("bad_messages", _NOT_TURN_BY_TURN)
                segs += [prefix[len(done):], full[len(prefix):]]
                train += [False, True]
                done = full
            rest = self.render(messages, False)
        except self._error as exc:
            raise BadRecord("bad_messages", f"the chat template rejected the messages ({exc})") from None
        if not rest.startswith(done):
            raise BadRecord("bad_messages", _NOT_TURN_BY_TURN)
        if len(rest) > len(done):
            segs.append(rest[len(done):])
            train.append(False)
        return segs, train


# ---------------------------------------------------------------------------------------------- extraction


class Extractor:
    """Turns one piece's records into Examples; applies the bad-record policy and counts into `stats`."""

    def __init__(self, spec: RecordSpec, tokenizer_dir: str | Path | None = None, special_tokens: dict | None = None):
        spec.validate()
        self.spec = spec
        self.chat = None
        if spec.kind == "sft" and spec.messages_field:
            template = chat_template(tokenizer_dir) if tokenizer_dir is not None else None
            if template is None:
                raise DataError(f"{tokenizer_dir}: the tokenizer has no chat_template (in tokenizer_config.json or "
                                "chat_template.jinja); --messages-field needs one, or use --prompt-field/"
                                "--response-field")
            self.chat = ChatRenderer(template, special_tokens or {})
        self._label_set = set(spec.labels) if spec.labels is not None else None

    def _hint(self, flag: str, what: str) -> str:
        return f"pass {flag} with the field that holds {what}"

    def _string(self, record: dict, name: str, flag: str, what: str) -> str:
        if name not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise BadRecord("missing_field", f"record has no field {name!r} (fields: {fields}); fix the record or "
                                             f"{self._hint(flag, what)} (now {name!r})")
        value = record[name]
        if not isinstance(value, str):
            raise BadRecord("not_a_string", f"field {name!r} is a JSON {json_type(value)}, not a string; fix the "
                                            f"record or {self._hint(flag, what)} (now {name!r})")
        return value

    def _text(self, record: dict) -> str:
        spec = self.spec
        parts = [self._string(record, f, "--text-field", "the text") for f in spec.text_fields]
        return parts[0] if len(parts) == 1 else spec.field_join.join(parts)

    def input_segments(self, record: dict) -> list[str]:
        """What a model reads of `record` to make a prediction: [text] (text), [text] or [text, pair]
        (classification; the label is not read), [prompt] (sft with --prompt-field: the response is what the model
        writes). Raises BadRecord for a missing or non-string field."""
        spec = self.spec
        if spec.kind == "sft":
            return [self._string(record, spec.prompt_field, "--prompt-field", "the prompt")]
        text = self._text(record)
        if spec.kind == "classification" and spec.text_pair_field:
            return [text, self._string(record, spec.text_pair_field, "--text-pair-field", "the second text")]
        return [text]

    def _label(self, record: dict):
        name = self.spec.label_field
        if name not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise BadRecord("missing_field", f"record has no field {name!r} (fields: {fields}); fix the record or "
                                             f"{self._hint('--label-field', 'the label')} (now {name!r})")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRecord("bad_label", f"label field {name!r} is a JSON {json_type(value)}, not a string or a "
                                         "non-negative integer; fix the record")
        if isinstance(value, int) and value < 0:
            raise BadRecord("bad_label", f"label field {name!r} is {value}, not a string or a non-negative integer; "
                                         "fix the record")
        if self.spec.num_labels is not None:
            if not isinstance(value, int) or value >= self.spec.num_labels:
                raise BadRecord("unknown_label", f"label {value!r} is not an integer in [0, --num-labels "
                                                 f"{self.spec.num_labels}); fix the record or raise --num-labels (or "
                                                 "name string labels with --labels)")
        elif self._label_set is None and isinstance(value, int) and value >= MAX_UNDECLARED_LABELS:
            raise BadRecord("bad_label", f"label {value} is too large: integer labels are class ids, {value + 1:,} "
                                         f"classes without --num-labels or --labels (the limit is "
                                         f"{MAX_UNDECLARED_LABELS:,}); fix the record or declare the classes with "
                                         "--num-labels N")
        if self._label_set is not None:
            known = value in self._label_set or (isinstance(value, int) and value < len(self.spec.labels))
            if not known:
                shown = ", ".join(map(str, self.spec.labels[:10]))
                raise BadRecord("unknown_label", f"label {value!r} is not one of --labels ({shown}); fix the record "
                                                 "or add it to --labels")
        return value

    def extract(self, record) -> Example | None:
        """The Example of one record; None for an empty document. Raises BadRecord."""
        spec = self.spec
        if isinstance(record, str):  # a .txt document
            if spec.kind != "text":
                raise DataError(f".txt inputs hold plain text only; --record-kind {spec.kind} needs jsonl, parquet "
                                "or csv records")
            return Example([record], None, None) if record.strip() else None
        if spec.kind == "text":
            text = self._text(record)
            return Example([text], None, None) if text.strip() else None
        if spec.kind == "classification":
            segments = self.input_segments(record)
            label = self._label(record)
            return Example(segments, None, label) if segments[0].strip() else None
        # sft
        if spec.messages_field:
            segs, train = self.chat.segments(self._messages(record))
        else:
            segs = self.input_segments(record) + [self._string(record, spec.response_field, "--response-field",
                                                               "the response")]
            train = [False, True]
        if not any(t and s.strip() for s, t in zip(segs, train)):
            return None
        return Example(segs, train, None)

    def _messages(self, record: dict) -> list:
        name = self.spec.messages_field
        if name not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise BadRecord("missing_field", f"record has no field {name!r} (fields: {fields}); fix the record or "
                                             f"{self._hint('--messages-field', 'the messages')} (now {name!r})")
        messages = record[name]
        if isinstance(messages, str):  # csv/parquet may carry the list as a JSON string
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                pass
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise BadRecord("bad_messages", f"field {name!r} is not a non-empty list of {{\"role\": str, \"content\": "
                                            "str}} messages; fix the record")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("bad_messages", f"field {name!r} has no assistant message, so nothing to train on; fix the "
                                            "record")
        return messages

    def examples(self, piece: Piece, stats: ReadStats) -> Iterator[tuple[int, Example]]:
        """(number within the piece, Example) for every usable record of the piece."""
        for number, record in iter_piece(piece, stats, self.spec.fields(), self.spec.txt_mode,
                                         self.spec.max_record_bytes):
            stats.docs_read += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                example = self.extract(record)
            except BadRecord as bad:
                if self.spec.on_bad == "error":
                    raise DataError(f"{location(piece, number)}: {bad.message}") from None
                stats.bad_records[bad.reason] = stats.bad_records.get(bad.reason, 0) + 1
                continue
            if example is None:
                stats.docs_empty_dropped += 1
                continue
            yield number, example


def iter_documents(files: Iterable[str], text_field: str | list[str] = "text", stats: ReadStats | None = None,
                   txt_mode: str = "file", field_join: str = "\n\n", max_record_mb: float | None = None
                   ) -> Iterator[Document]:
    """Non-empty text documents of `files` in order (error on the first bad record); empty or whitespace-only ones
    are dropped and counted in `stats`. Used by tokenizer training; `tokenize` reads Examples (`Extractor`)."""
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    extractor = Extractor(RecordSpec(text_fields=tuple(fields), field_join=field_join, txt_mode=txt_mode,
                                     max_record_mb=max_record_mb or DEFAULT_MAX_RECORD_MB))
    stats = stats if stats is not None else ReadStats()
    for path in files:
        piece = Piece(path, 0, -1)
        for number, example in extractor.examples(piece, stats):
            yield Document(example.segments[0], path, number)
