"""Records → token ids for one tokenizer, in the model family's own framing: the one encoding `tokenize` writes into
shards (`encode_examples`) and `train.predict` applies to new records (`encode_input`).

The framing is what the tokenizer's post-processor puts around a text or a pair of texts: `[CLS] a [SEP]` and
`[CLS] a [SEP] b [SEP]` with token type ids 0…0 1…1 for BERT, `<s> a </s></s> b </s>` for RoBERTa,
`<|begin_of_text|> a` for Llama 3, `<s> a` for Mistral, nothing for GPT-2. It is read once from the tokenizer
(`read_framing`: probe texts encoded with special tokens, split by their sequence ids) and applied to ids encoded
without special tokens, so the batch encode stays one plain call (gigatoken's fast path) and a record's ids equal
`AutoTokenizer.from_pretrained(dir)(text)` (and `(text, pair)`). Per record kind:

  text            before + ids + after, then eos unless `after` already ends with it (BERT's [SEP] is its eos)
  classification  the template (single or pair); a tokenizer whose template adds nothing (GPT-2, ours) closes each
                  text with eos instead, so a decoder classifier pools an eos and a pair's texts stay apart
  sft             prompt/response: before + prompt + response + eos; chat messages: the chat template's rendering
                  (it writes its own BOS text), + eos unless the last assistant turn already holds it (a template
                  that closes its turns with eos, as Qwen's ChatML and Llama-3-Instruct's do, gives exactly
                  `apply_chat_template`'s ids). The loss mask is 1 on trainable segments and the final eos.

Token type ids are kept (per token, with the sft mask's storage) only where the pair template gives some token a
non-zero type and the template closes a text, as an encoder's does (BERT-style pairs); elsewhere they are all 0,
the models' default (decoders take none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tokenizers import Tokenizer

from data_prep.backend import TokenizerBackend
from data_prep.errors import DataError
from data_prep.records import Example, Extractor, RecordSpec

PROBE = ("a", "b")


@dataclass(frozen=True)
class Framing:
    """The special tokens a tokenizer's post-processor puts around a single text and a pair, with their token type
    ids; and the tokenizer's document separator (eos)."""

    eos: int
    single: tuple[tuple[int, ...], tuple[int, ...]]  # (before the text, after it)
    pair: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (before a, between a and b, after b)
    pair_types: tuple[tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...]]  # types of before, a, between,
    #                                                                                   b, after

    @property
    def templated(self) -> bool:
        """Whether the post-processor adds special tokens (an encoder's [CLS]/[SEP], a decoder's BOS)."""
        return bool(self.single[0] or self.single[1])

    @property
    def pair_has_types(self) -> bool:
        """Whether some token of a pair has a non-zero type (only an encoder's template: see read_framing)."""
        before, a, between, b, after = self.pair_types
        return any((*before, a, *between, b, *after))

    def as_dict(self) -> dict:
        return {"eos": self.eos, "single": [list(x) for x in self.single], "pair": [list(x) for x in self.pair],
                "pair_types": [list(x) if isinstance(x, tuple) else x for x in self.pair_types]}


def _split(ids: list[int], sequence_ids: list[int | None], types: list[int], sequences: int):
    """The special-token runs around each sequence: ([ids before seq 0, between, ..., after the last], their types,
    the type of each sequence)."""
    runs, run_types, seq_types, current, current_types = [], [], [], [], []
    seen = -1
    for token, seq, t in zip(ids, sequence_ids, types):
        if seq is None:
            current.append(token)
            current_types.append(t)
        elif seq != seen:
            runs.append(tuple(current))
            run_types.append(tuple(current_types))
            seq_types.append(t)
            current, current_types, seen = [], [], seq
    runs.append(tuple(current))
    run_types.append(tuple(current_types))
    if len(runs) != sequences + 1:
        raise DataError("the tokenizer's post-processor does not keep the texts of a pair apart; it cannot frame "
                        "records")
    return runs, run_types, seq_types


def read_framing(tokenizer: Tokenizer, eos: int) -> Framing:
    """The framing of `tokenizer` (padding and truncation already off, as data_prep.backend loads it)."""
    single = tokenizer.encode(PROBE[0], add_special_tokens=True)
    pair = tokenizer.encode(*PROBE, add_special_tokens=True)
    (before, after), _, _ = _split(single.ids, single.sequence_ids, single.type_ids, 1)
    (p_before, p_between, p_after), (t_before, t_between, t_after), (t_a, t_b) = _split(
        pair.ids, pair.sequence_ids, pair.type_ids, 2)
    if not after:
        # Token type ids belong to encoders, whose template closes a text ([SEP]). A decoder's template only opens
        # it (Llama's, Mistral's BOS) or adds nothing (GPT-2), yet tokenizers still number a pair's second text 1;
        # those models take no token type ids (transformers returns none for them): all 0.
        t_before, t_a, t_between, t_b, t_after = (0,) * len(t_before), 0, (0,) * len(t_between), 0, (0,) * len(t_after)
    return Framing(eos, (before, after), (p_before, p_between, p_after), (t_before, t_a, t_between, t_b, t_after))


@dataclass(frozen=True)
class _Frame:
    """What goes around the segments of one kind of record: ids before the first, between two, after the last, with
    their token types."""

    before: tuple[int, ...] = ()
    between: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    types: tuple | None = None  # (before, first segment, between, second segment, after) types; None: all 0


def _frame(framing: Framing, spec: RecordSpec, segments: int) -> _Frame:
    eos = (framing.eos,)
    before, after = framing.single
    if spec.kind == "text":
        return _Frame(before, (), after if after[-1:] == eos else after + eos)
    if spec.kind == "classification":
        if not framing.templated:
            return _Frame((), eos, eos)
        if segments == 1:
            return _Frame(before, (), after)
        p_before, p_between, p_after = framing.pair
        return _Frame(p_before, p_between, p_after, framing.pair_types if framing.pair_has_types else None)
    return _Frame(() if spec.messages_field else before, (), eos)  # sft: the chat template writes its own BOS


def _closed_with_eos(flat: np.ndarray, seg_starts: np.ndarray, seg_ends: np.ndarray, first: int, example: Example,
                     eos: int) -> bool:
    """Whether the chat template already put eos into the example's last trainable segment (its last assistant
    turn), whose segments start at index `first` of the batch."""
    last = max(j for j, trainable in enumerate(example.trainable) if trainable)
    return bool((flat[seg_starts[first + last]:seg_ends[first + last]] == eos).any())


def with_type_ids(framing: Framing, spec: RecordSpec) -> bool:
    """Whether records of `spec` carry token type ids (classification pairs of a BERT-style tokenizer)."""
    return spec.kind == "classification" and bool(spec.text_pair_field) and framing.pair_has_types


def encode_examples(encoder: TokenizerBackend, examples: list[Example], dtype: np.dtype, framing: Framing,
                    spec: RecordSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(tokens, document lengths, per-token uint8 extra) of a batch: each example's segments encoded separately and
    framed (module docstring). The extra is sft's loss mask, or classification pairs' token type ids where the
    framing has them, else None. No per-token Python loop."""
    texts = [text for example in examples for text in example.segments]
    flat, seg_lengths = encoder.encode_batch(texts)
    if flat.size and int(flat.max()) >= encoder.vocab_size:
        raise DataError(f"{encoder.directory}: the tokenizer produced id {int(flat.max())} >= its vocabulary "
                        f"size {encoder.vocab_size}; the tokenizer dir is inconsistent")
    seg_ends = np.cumsum(seg_lengths)
    seg_starts = seg_ends - seg_lengths
    if all(len(e.segments) == 1 for e in examples) and spec.kind != "sft":  # text, single-text classification
        frame = _frame(framing, spec, 1)
        # Per document: `before` at its start, then `after` at its end (np.insert keeps the order of equal
        # positions, and a document's end is the next one's start).
        positions = np.concatenate([np.repeat(seg_starts[:, None], len(frame.before), 1),
                                    np.repeat(seg_ends[:, None], len(frame.after), 1)], axis=1).ravel()
        values = np.tile(np.asarray(frame.before + frame.after, dtype=dtype), len(examples))
        tokens = np.insert(flat.astype(dtype), positions, values)
        return tokens, seg_lengths + len(frame.before) + len(frame.after), None
    positions, values, types, trained = [], [], [], []
    lengths = np.zeros(len(examples), dtype=np.int64)
    segment_types = []
    s = 0
    for d, example in enumerate(examples):
        n = len(example.segments)
        frame = _frame(framing, spec, n)
        if spec.messages_field and _closed_with_eos(flat, seg_starts, seg_ends, s, example, framing.eos):
            frame = replace(frame, after=())
        kinds = frame.types or ((0,) * len(frame.before), 0, (0,) * len(frame.between), 0, (0,) * len(frame.after))
        inserts = [(seg_starts[s], frame.before, kinds[0], False)]
        inserts += [(seg_ends[s + j], frame.between, kinds[2], False) for j in range(n - 1)]
        inserts.append((seg_ends[s + n - 1], frame.after, kinds[4], spec.kind == "sft"))  # sft trains the eos
        for position, ids, id_types, train in inserts:
            positions += [int(position)] * len(ids)
            values += ids
            types += id_types
            trained += [train] * len(ids)
            lengths[d] += len(ids)
        lengths[d] += int(seg_lengths[s:s + n].sum())
        segment_types += [kinds[1]] + [kinds[3]] * (n - 1)
        s += n
    tokens = np.insert(flat.astype(dtype), positions, np.asarray(values, dtype=dtype))
    if spec.kind == "sft":
        flags = [t for example in examples for t in example.trainable]
        extra = np.insert(np.repeat(np.asarray(flags, dtype=np.uint8), seg_lengths), positions,
                          np.asarray(trained, dtype=np.uint8))
    elif with_type_ids(framing, spec):
        extra = np.insert(np.repeat(np.asarray(segment_types, dtype=np.uint8), seg_lengths), positions,
                          np.asarray(types, dtype=np.uint8))
    else:
        extra = None
    return tokens, lengths, extra


def encode_input(encoder: TokenizerBackend, framing: Framing, extractor: Extractor, record: dict
                 ) -> tuple[list[int], list[int] | None]:
    """(ids, token type ids or None where the framing has none) that a model reads of one raw `record` to make a
    prediction, framed as its training records were: a text or classification record as `encode_examples` frames
    it (the label is not read); an sft prompt as it stands before its response (what the template puts before a
    text, then the prompt's ids; no eos). Raises BadRecord (`data_prep.pieces`) for a missing or non-string field."""
    spec = extractor.spec
    segments = extractor.input_segments(record)
    if spec.kind == "sft":
        flat, _ = encoder.encode_batch(segments)
        return list(_frame(framing, spec, 1).before) + flat.astype(np.int64).tolist(), None
    tokens, _, types = encode_examples(encoder, [Example(segments, None, None)], np.dtype(np.int64), framing, spec)
    return tokens.tolist(), (types.tolist() if types is not None else None)
