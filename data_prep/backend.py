"""`TokenizerBackend`: encode batches of documents with a HF tokenizer dir, fast path via gigatoken when it agrees.

gigatoken is a faster re-implementation of byte-level BPE. It is used only if, on a sample of the actual corpus,
it produces exactly the ids of the reference `tokenizers` implementation; otherwise (or if it cannot load the
tokenizer) we fall back to `tokenizers` and say why. Either way the ids are those of
`tokenizers.Tokenizer.from_file(dir/tokenizer.json).encode(text, add_special_tokens=False)`, with padding and
truncation off whatever tokenizer.json says: a model's tokenizer.json often carries its fine-tuning settings (a
BERT's `padding: Fixed 128`, `truncation: 128`), which would pad every short document and silently cut every long
one. A directory without tokenizer.json in the slow formats (`vocab.json` + `merges.txt`, `vocab.txt`, a
SentencePiece `tokenizer.model`) is converted to a fast tokenizer by transformers, imported only then.

The env var DATA_PREP_BACKEND=gigatoken|tokenizers forces a backend (tests use it to compare the two); forcing
gigatoken still runs the sample check and fails if the ids differ.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from data_prep.errors import DataError

BACKENDS = ("gigatoken", "tokenizers")
BACKEND_ENV = "DATA_PREP_BACKEND"


# Slow-format tokenizer files that transformers converts to a fast tokenizer (any one of them suffices to try).
SLOW_FORMAT_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                     "sentencepiece.bpe.model")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The directory's tokenizer with padding and truncation off (see the module docstring)."""
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{path}: cannot be loaded by tokenizers ({exc}); fix or regenerate the file") from None
    else:
        tokenizer = _convert_slow_format(Path(directory))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _convert_slow_format(directory: Path) -> Tokenizer:
    """A fast tokenizer from a slow-format directory, through transformers' own conversion (the one
    `AutoTokenizer.from_pretrained(directory)` applies), so the ids equal what the model's users get."""
    if not directory.is_dir():
        raise DataError(f"{directory}: tokenizer directory not found")
    present = [name for name in SLOW_FORMAT_FILES if (directory / name).is_file()]
    if not present:
        raise DataError(f"{directory}: no tokenizer.json and no slow-format tokenizer files ({', '.join(SLOW_FORMAT_FILES)}); "
                        "give a directory written by `python -m data_prep tokenizer` or a HuggingFace tokenizer "
                        "directory")
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here (OSError, ValueError, ImportError, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{directory}: transformers cannot load this tokenizer from {', '.join(present)} "
                        f"({type(exc).__name__}: {message}); add its tokenizer_config.json (or tokenizer.json)") from None
    if not getattr(loaded, "is_fast", False):
        raise DataError(f"{directory}: transformers loads only a slow tokenizer ({type(loaded).__name__}) from "
                        f"{', '.join(present)}; save a fast one with `AutoTokenizer.from_pretrained(dir)"
                        ".save_pretrained(dir)` where the conversion's dependencies are installed")
    return Tokenizer.from_str(loaded.backend_tokenizer.to_str())


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens as a string or as an AddedToken dict {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_token_ids(directory: str | Path, tokenizer: Tokenizer, eos_token: str | None = None) -> dict:
    """{"eos_id", "bos_id", "pad_id"} from tokenizer_config.json / special_tokens_map.json. eos separates documents
    in the shards: `eos_token` when given (`tokenize --eos-token`), else the config's eos_token, else
    `<|endoftext|>` when the vocabulary has it, else the config's sep_token (an encoder such as BERT ends every
    sequence with [SEP] and has no eos); None when there is none (`tokenize` refuses that, see `require_eos`)."""
    directory = Path(directory)
    names: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        path = directory / file
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: not valid JSON ({exc}); fix or regenerate the file") from None
            for key in ("eos_token", "bos_token", "pad_token", "sep_token"):
                if _token_content(config.get(key)) is not None:
                    names[key] = _token_content(config[key])
    if eos_token is not None:
        if tokenizer.token_to_id(eos_token) is None:
            raise DataError(f"--eos-token {eos_token!r} is not in the vocabulary of {directory}; name one of its "
                            "special tokens")
        names["eos_token"] = eos_token
    if "eos_token" not in names and tokenizer.token_to_id("<|endoftext|>") is not None:
        names["eos_token"] = "<|endoftext|>"
    names.setdefault("eos_token", names.get("sep_token"))
    ids = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        name = names.get(key)
        token_id = tokenizer.token_to_id(name) if name is not None else None
        if name is not None and token_id is None:
            raise DataError(f"{directory}: {key} {name!r} is not in the tokenizer's vocabulary; fix "
                            "tokenizer_config.json")
        ids[key.replace("_token", "_id")] = token_id
    return ids


def require_eos(directory: str | Path, special_ids: dict) -> int:
    """The eos id of `special_token_ids`; a DataError saying how to name one when the tokenizer has none."""
    if special_ids["eos_id"] is None:
        raise DataError(f"{directory}: the tokenizer has no eos_token or sep_token (one is needed between "
                        "documents); name one of its special tokens with --eos-token, or set eos_token in its "
                        "tokenizer_config.json")
    return special_ids["eos_id"]


class TokenizerBackend:
    """Encodes batches to (flat uint32 ids, per-document lengths). `name` is the backend in use and `reason` why."""

    def __init__(self, directory: str | Path, sample_texts: Sequence[str] = (), backend: str | None = None,
                 checked: bool = False):
        self.directory = Path(directory)
        self.tokenizer = load_tokenizer(directory)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = special_token_ids(directory, self.tokenizer)
        backend = backend or os.environ.get(BACKEND_ENV) or None
        if backend is not None and backend not in BACKENDS:
            raise DataError(f"{BACKEND_ENV}={backend!r}: unknown backend; use one of {', '.join(BACKENDS)}")
        self._giga = None
        self.parallel: bool | None = None  # gigatoken's thread pool: None = its default (on, except in workers)
        if backend == "tokenizers":
            self.name, self.reason = "tokenizers", f"forced by {BACKEND_ENV}"
            return
        if checked and backend == "gigatoken":  # a worker: the parent already compared gigatoken with tokenizers
            import gigatoken

            self._giga, self.name, self.reason = gigatoken.Tokenizer(self.tokenizer), "gigatoken", "checked by parent"
            return
        self._giga, self.reason = self._try_gigatoken(sample_texts)
        if self._giga is not None:
            self.name = "gigatoken"
        elif backend == "gigatoken":
            raise DataError(f"{BACKEND_ENV}=gigatoken but gigatoken cannot be used: {self.reason}")
        else:
            self.name = "tokenizers"

    def _try_gigatoken(self, sample_texts: Sequence[str]):
        try:
            import gigatoken  # optional fast path: imported here so a missing/broken install only means fallback

            giga = gigatoken.Tokenizer(self.tokenizer)
        except Exception as exc:  # its message may carry a Rust source location on later lines: keep the first
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return None, f"gigatoken could not load this tokenizer ({type(exc).__name__}: {first_line})"
        sample = list(sample_texts)
        if not sample:
            return None, "no sample documents to check gigatoken against tokenizers"
        flat, lengths = self._encode_gigatoken(giga, sample)
        ref_flat, ref_lengths = self._encode_tokenizers(sample)
        if not (np.array_equal(lengths, ref_lengths) and np.array_equal(flat, ref_flat)):
            where = _first_mismatch(flat, lengths, ref_flat, ref_lengths)
            return None, f"gigatoken ids differ from tokenizers on {where} of {len(sample)} sample documents"
        return giga, f"gigatoken ids equal tokenizers ids on {len(sample)} sample documents"

    @staticmethod
    def _encode_gigatoken(giga, texts: Sequence[str], parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        # An awkward ragged array: offsets + flat ids, read zero-copy. parallel=False encodes on this thread (our
        # worker threads run several batches at once; gigatoken releases the GIL while encoding).
        ragged = giga.encode_batch(list(texts), parallel=parallel)
        layout = ragged.layout
        try:
            offsets = np.asarray(layout.offsets.data, dtype=np.int64)
            flat = np.asarray(layout.content.data, dtype=np.uint32)[offsets[0]:offsets[-1]]
            return flat, np.diff(offsets)
        except AttributeError:  # another layout than ListOffsetArray(NumpyArray): the generic (copying) way
            import awkward as ak  # ships as gigatoken's dependency

            flat = np.asarray(ak.flatten(ragged, axis=1), dtype=np.uint32)
            return flat, np.asarray(ak.num(ragged, axis=1), dtype=np.int64)

    def _encode_tokenizers(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32,
                           count=int(lengths.sum()))
        return flat, lengths

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids of all documents concatenated, int64 number of ids per document); no eos added."""
        if self._giga is not None:
            if self.parallel is not None:
                return self._encode_gigatoken(self._giga, texts, self.parallel)
            return self._encode_gigatoken(self._giga, texts)
        return self._encode_tokenizers(texts)


def _first_mismatch(flat, lengths, ref_flat, ref_lengths) -> str:
    """'document i' for the first sample document whose ids differ (for the fallback message)."""
    ends, ref_ends = np.cumsum(lengths), np.cumsum(ref_lengths)
    for i in range(len(lengths)):  # runs once, over <= a few hundred sample documents, only on a mismatch
        if not np.array_equal(flat[ends[i] - lengths[i]:ends[i]], ref_flat[ref_ends[i] - ref_lengths[i]:ref_ends[i]]):
            return f"document {i}"
    return "the sample"
