"""Shared fixtures: a tiny corpus, tokenizer and shards built once per session through the real CLI, and a helper
that runs `deepspeed train/main.py` with 2 ranks exactly as a user would."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a one every some model data token shard rank step loss falls rises gradient learns reads writes "
         "quick slow small large red blue cat dog bird tree river stone light dark north south and but or then "
         "because while after before runs jumps sleeps sings").split()


def write_corpus(path: Path, docs: int, seed: int = 0) -> None:
    """A deterministic corpus of short pseudo-English documents with enough structure for a loss to fall."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                         for _ in range(rng.randint(2, 6))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")


def data_prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """corpus.jsonl -> tokenizer (vocab 512) -> shards with a 10% validation split."""
    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, docs=3000)
    data_prep("tokenizer", "--input", str(corpus), "--output", str(root / "tokenizer"), "--vocab-size", "512")
    data_prep("tokenize", "--input", str(corpus), "--tokenizer", str(root / "tokenizer"),
              "--output", str(root / "shards"), "--val-fraction", "0.1")
    return {"root": root, "corpus": corpus, "tokenizer": root / "tokenizer", "shards": root / "shards"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_MODEL = ["model.model_type=gpt2", "model.hf_config={n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64}",
              "data.seq_len=64", "train.micro_batch_size=4", "optim.warmup_steps=4", "optim.lr=3.0e-3"]


def reference_overrides(tiny_data: dict, output_dir: Path, name: str, stage: int, steps: int) -> list[str]:
    """The tiny model on the tiny shards, logging every step. Dropout stays on (GPT-2's default 0.1) and gradients
    accumulate over 2 micro-batches, so an exact resume needs every rank's RNG and the sampler position."""
    return [*TINY_MODEL, f"train.max_steps={steps}", "train.grad_accum_steps=2", "train.log_every=1",
            "eval.every=4", "checkpoint.every=4", "eval.batches=4", "train.precision=auto",
            f"train.deepspeed_config=ds_configs/zero{stage}.json", f"data.path={tiny_data['shards']}",
            f"run.output_dir={output_dir}", f"run.name={name}"]


def run_training(config: str | Path, overrides: list[str], num_ranks: int = 2, env: dict | None = None,
                 check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N train/main.py --config ... overrides`, from the project root."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), "train/main.py", "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged record}; a later line for the same step (after a resume) wins."""
    records: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    return records


POSITIVE, NEGATIVE = WORDS[:len(WORDS) // 2], WORDS[len(WORDS) // 2:]


def write_classification_corpus(path: Path, docs: int, seed: int = 1) -> None:
    """Separable sentiment-like data: label `pos` documents use only the first half of WORDS, `neg` the second."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(docs):
            label = rng.choice(("pos", "neg"))
            words = POSITIVE if label == "pos" else NEGATIVE
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def write_sft_corpus(path: Path, docs: int, seed: int = 2) -> None:
    """Prompt/response pairs with a learnable rule: the response repeats the prompt's words in reverse order."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
            f.write(json.dumps({"prompt": "reverse: " + " ".join(words) + "\n",
                                "response": " ".join(reversed(words))}) + "\n")


@pytest.fixture(scope="session")
def finetune_data(tiny_data) -> dict:
    """Classification and sft shards (train / val / test) made with the tiny_data tokenizer."""
    root = tiny_data["root"]
    write_classification_corpus(root / "cls.jsonl", docs=480)
    write_sft_corpus(root / "sft.jsonl", docs=400)
    data_prep("tokenize", "--input", str(root / "cls.jsonl"), "--tokenizer", str(tiny_data["tokenizer"]),
              "--output", str(root / "cls_shards"), "--record-kind", "classification", "--labels", "neg,pos",
              "--val-count", "64", "--test-count", "64")
    data_prep("tokenize", "--input", str(root / "sft.jsonl"), "--tokenizer", str(tiny_data["tokenizer"]),
              "--output", str(root / "sft_shards"), "--record-kind", "sft", "--val-count", "32", "--test-count", "32")
    return {"cls": root / "cls_shards", "sft": root / "sft_shards"}


TINY_ARCHITECTURES = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64},
    "llama": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False},
    "bert": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": 64},
}


@pytest.fixture(scope="session")
def pretrained_models(tiny_data) -> dict:
    """A user's local model dirs: tiny random gpt2 and llama (causal LM) and bert (encoder), saved with
    save_pretrained next to a copy of the tiny_data tokenizer, as a downloaded model would be."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    root = tiny_data["root"] / "pretrained"
    out = {}
    for model_type, kwargs in TINY_ARCHITECTURES.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                      **kwargs)
        model = (AutoModel if model_type == "bert" else AutoModelForCausalLM).from_config(config)
        model.save_pretrained(root / model_type)
        shutil.copytree(tiny_data["tokenizer"], root / model_type, dirs_exist_ok=True)
        out[model_type] = root / model_type
    return out


@pytest.fixture(scope="session")
def blend_spec(tiny_data, tmp_path_factory) -> Path:
    """A blend spec: the tiny_data shards with weight 3 and a second corpus (same tokenizer) with weight 1."""
    root = tmp_path_factory.mktemp("blend")
    write_corpus(root / "other.jsonl", docs=600, seed=5)
    data_prep("tokenize", "--input", str(root / "other.jsonl"), "--tokenizer", str(tiny_data["tokenizer"]),
              "--output", str(root / "other"), "--val-fraction", "0.1")
    spec = root / "blend.txt"
    spec.write_text(f"{tiny_data['shards']}: 3\n{root / 'other'}: 1\n")
    return spec
