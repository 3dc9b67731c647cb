"""Train a byte-level BPE tokenizer on the corpus (streamed) and save it as a HuggingFace tokenizer directory.

The directory holds `tokenizer.json` (written by `tokenizers`), `tokenizer_config.json` and
`special_tokens_map.json`, which is what `transformers.AutoTokenizer.from_pretrained(dir)` needs, without
importing transformers here. `<|endoftext|>` is eos and bos (GPT-2 style); `<|pad|>` is pad; there is no unk token
(byte-level BPE covers every byte). The directory appears atomically: built under a temp name, then renamed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_prep.errors import DataError
from data_prep.files import atomic_directory
from data_prep.pieces import ReadStats
from data_prep.progress import Progress
from data_prep.records import iter_documents

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1
# Files an existing --output may hold for us to replace it; anything else means it is not a tokenizer dir we made,
# and replacing it (moving it aside and deleting it) could destroy the user's files.
REPLACEABLE = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def check_output(output: Path) -> None:
    if output.exists():
        if not output.is_dir():
            raise DataError(f"{output}: exists and is not a directory; choose another --output")
        foreign = sorted(p.name for p in output.iterdir() if p.name not in REPLACEABLE)
        if foreign:
            raise DataError(f"{output}: exists and holds files other than a tokenizer's ({', '.join(foreign[:5])});"
                            " choose a new --output or remove it")


def build_trainer(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE())  # no unk_token: every byte is in the initial alphabet
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids are unchanged
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    return tokenizer, trainer


def save_tokenizer_dir(tokenizer: Tokenizer, output: str | Path, model_max_length: int) -> Path:
    """Write the HF tokenizer dir; it appears atomically, replacing an old one (`data_prep.files`)."""
    output = Path(output)
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "clean_up_tokenization_spaces": False, "add_prefix_space": False, **special}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return output


def train_tokenizer(files: list[str], output: str | Path, vocab_size: int, text_field: str | list[str] = "text",
                    model_max_length: int = 2048, txt_mode: str = "file", field_join: str = "\n\n",
                    max_record_mb: float | None = None) -> tuple[Tokenizer, ReadStats]:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    check_output(Path(output))  # fail before training, not after
    tokenizer, trainer = build_trainer(vocab_size)
    stats = ReadStats()
    progress = Progress("tokenizer: reading")

    def texts() -> Iterable[str]:
        # Streamed: tokenizers pulls documents from this generator, the corpus is never held in memory.
        for doc in iter_documents(files, text_field, stats, txt_mode=txt_mode, field_join=field_join,
                                  max_record_mb=max_record_mb):
            progress.update(1, stats.bytes_read)
            yield doc.text

    tokenizer.train_from_iterator(texts(), trainer)
    progress.finish(f", vocab {tokenizer.get_vocab_size(with_added_tokens=True):,}")
    if stats.docs_read == stats.docs_empty_dropped:
        raise DataError(f"the inputs hold no non-empty documents ({stats.docs_read} read); nothing to train on")
    save_tokenizer_dir(tokenizer, output, model_max_length)
    return tokenizer, stats
