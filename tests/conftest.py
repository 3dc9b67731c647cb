"""Shared fixtures and helpers of every tier (one home for each).

- The tiny pipeline: a corpus, tokenizer and shards built once per session with data_prep's command line run in
  this process (`data_prep`), tiny pretrained model directories, and `run_training`, which starts
  `deepspeed train/main.py` with 2 ranks exactly as a user would (tests/distributed/, tests/slurm/).
- data_prep's test corpora (`tiny`, `parallel_corpus`) and readers of shard directories (`docs_of`, `masks_of`).
- train.predict / train.export without training: a tokenizer, tiny saved models and a run directory as the trainer
  leaves it (`tok`, `cls_model`, `lm_model`, `fake_run`), and a planted checkpoint holding a live pickle payload
  (`Payload`, `evil`).
- `run_data_prep`: `python -m data_prep` as a separate process, for the tests of its process behaviour (tests/cli/).
- Real tokenizer and model files of several families (`real_model_dir`, tests/real_files.py), and hypothesis settings
  and a scratch directory for the property-based tests (`fuzz_settings`, `scratch`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.real_files import real_model_dir  # noqa: F401 (a fixture: real tokenizer and model files)

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a one every some model data token shard rank step loss falls rises gradient learns reads writes "
         "quick slow small large red blue cat dog bird tree river stone light dark north south and but or then "
         "because while after before runs jumps sleeps sings").split()


TIERS = ("unit", "cli", "distributed", "slurm")


def pytest_collection_modifyitems(items):
    """The in-process unit tier first, then the tools as processes, then the multi-process runs: a broken build
    fails in a minute instead of after half an hour of 2-rank runs (stable: file order within a tier)."""
    items.sort(key=lambda item: TIERS.index(item.path.relative_to(ROOT / "tests").parts[0]))


def write_corpus(path: Path, docs: int, seed: int = 0) -> None:
    """A deterministic corpus of short pseudo-English documents with enough structure for a loss to fall."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                         for _ in range(rng.randint(2, 6))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")


def data_prep(*args: str) -> None:
    """`python -m data_prep ARGS`, run in this process: its `main` returns 0, or raises (DataError, SystemExit)."""
    from data_prep.__main__ import main

    assert main(list(args)) == 0


def run_data_prep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` as its own process, from the project root (exit status, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


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


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_training(config: str | Path, overrides: list[str], num_ranks: int = 2, env: dict | None = None,
                 check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N train/main.py --config ... overrides`, from the project root. One rank runs as
    `python train/main.py --config ...`, the documented single-process command, which skips the ~5 s that DeepSpeed's
    launcher processes take to start and stop."""
    if num_ranks == 1:
        launch = [sys.executable, "train/main.py"]
        base_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    else:
        launch = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks),
                  "--master_port", str(free_port()), "train/main.py"]
        base_env = dict(os.environ)
    proc = subprocess.run([*launch, "--config", str(config), *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base_env, **(env or {})})
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


# ------------------------------------------------------------------------------------------------ data_prep corpora

PREP_WORDS = ("alpha beta gamma delta token shard rank step loss falls rises model data reads writes quick slow "
              "café naïve 日本語 über {} [] () = + def return class").split()


def random_text(rng: random.Random) -> str:
    """1-4 lines of PREP_WORDS (accents, CJK, brackets): what a tokenizer must round-trip."""
    lines = [" ".join(rng.choice(PREP_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
    return "\n".join(lines)


def reference_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """What `tokenizers` itself gives for each text, without special tokens: the ids shards must hold."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def docs_of(shards, per_token: bool = False) -> list[list[int]]:
    """Every document of a ShardSet's split, in order, as a list of ids (eos included); with `per_token`, each
    document's per-token uint8 values instead (the sft loss mask, or a pair's token type ids)."""
    out = []
    for i in range(shards.num_shards):
        values, offsets = (shards.loss_mask(i) if per_token else shards.tokens(i)), shards.doc_offsets(i)
        out += [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def masks_of(shards) -> list[list[int]]:
    """Every document's sft loss mask, in order."""
    return docs_of(shards, per_token=True)


def files_of(directory: Path) -> dict[str, bytes]:
    """{file name: bytes} of a directory: equal dicts are byte-identical outputs."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_docs(tiny: dict, texts: list[str]) -> list[list[int]]:
    """The documents shards made with `tiny`'s tokenizer hold for these texts: their ids, then eos (0)."""
    return [ids + [0] for ids in reference_ids(tiny["hf"], texts)]


def random_texts(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(n)]


def read_documents(paths: list[str], text_field: str = "text") -> tuple[list, object]:
    """Every document data_prep reads from these inputs (files, directories, globs), and its ReadStats."""
    from data_prep.pieces import ReadStats
    from data_prep.readers import expand_inputs
    from data_prep.records import iter_documents

    stats = ReadStats()
    return list(iter_documents(expand_inputs(paths), text_field, stats)), stats


def shard_hashes(manifest: dict) -> dict:
    """split -> the sha256 of each of its files (tokens, index, mask, labels): equal hashes = identical shards."""
    keys = ("sha256", "index_sha256", "mask_sha256", "labels_sha256")
    return {s: [[e.get(k) for k in keys] for e in m["shards"]] for s, m in manifest["splits"].items()}


# A jsonl file with one bad record of each kind between two good ones.
BAD_JSONL = (b'{"text": "good one"}\n'
             b'{"text": broken}\n'  # 2 invalid_json
             b'["text"]\n'  # 3 not_an_object
             b'{"body": "x"}\n'  # 4 missing_field
             b'{"text": 12}\n'  # 5 not_a_string
             b'{"text": "caf\xe9"}\n'  # 6 invalid_utf8
             b'{"text": "   "}\n'  # 7 empty: dropped, not bad
             b'\n'  # blank line: not a record
             b'{"text": "good two"}\n')
# 3,000 short jsonl documents: enough bytes to cut a compressed file of them anywhere.
NUMBERED_JSONL = b"".join(json.dumps({"text": f"document {i} alpha beta gamma"}).encode() + b"\n" for i in range(3000))


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def with_chat_template(tokenizer_dir: Path, directory: Path) -> Path:
    """A copy of `tokenizer_dir` at `directory` whose tokenizer_config.json carries CHATML as its chat template."""
    shutil.copytree(tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """data_prep's corpus: a jsonl file (120 docs of random_text), 3 .txt documents and a 400-token byte-level BPE
    trained on them; `hf` is that tokenizer loaded with `tokenizers`, `docs` every text in reading order."""
    from tokenizers import Tokenizer

    from data_prep.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data_prep")
    rng = random.Random(0)
    jsonl_docs = [random_text(rng) for _ in range(120)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                               for i, t in enumerate(jsonl_docs)), encoding="utf-8")
    (root / "txt").mkdir()
    txt_docs = [random_text(rng) + "\n" for _ in range(3)]
    for i, text in enumerate(txt_docs):
        (root / "txt" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tokenizer_dir = root / "tokenizer"
    train_tokenizer([str(root / "corpus.jsonl")], tokenizer_dir, vocab_size=400)
    return {"root": root, "jsonl": root / "corpus.jsonl", "txt_dir": root / "txt", "docs": jsonl_docs + txt_docs,
            "tokenizer": tokenizer_dir, "hf": Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))}


PARALLEL_ARGS = dict(val_fraction=0.1, test_count=20, shard_tokens=2_000)  # tokenize_corpus arguments


@pytest.fixture(scope="session")
def parallel_corpus(tmp_path_factory) -> dict:
    """600 random_text documents in three jsonl files (a work unit may span file boundaries)."""
    root = tmp_path_factory.mktemp("parallel")
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(600)]
    paths = []
    for k in range(3):
        paths.append(root / f"part{k}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k * 200:(k + 1) * 200]))
    return {"paths": [str(p) for p in paths], "texts": texts}


# Hypothesis settings of the property-based tests: FUZZ_EXAMPLES=5000 for a longer hunt; 200 keeps them fast.
fuzz_settings = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ predict and export


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Path:
    """A directory holding `tokenizer/`: a 320-token BPE trained on write_corpus text."""
    from data_prep.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("predict_tok")
    write_corpus(root / "corpus.jsonl", docs=300)
    train_tokenizer([str(root / "corpus.jsonl")], root / "tokenizer", vocab_size=320)
    return root


def save_model(directory: Path, tokenizer_dir: Path, classify: bool) -> Path:
    """A tiny random GPT-2 (classifier with labels neg/pos, or causal LM) saved as an exported model would be."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    labels = {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}} if classify else {}
    config = AutoConfig.for_model("gpt2", vocab_size=320, n_layer=1, n_embd=32, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=1, **labels)
    model = (AutoModelForSequenceClassification if classify else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(directory)
    shutil.copytree(tokenizer_dir, directory, dirs_exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def cls_model(tok) -> Path:
    return save_model(tok / "cls_model", tok / "tokenizer", classify=True)


@pytest.fixture(scope="session")
def lm_model(tok) -> Path:
    return save_model(tok / "lm_model", tok / "tokenizer", classify=False)


@pytest.fixture
def fake_run(tok, tmp_path) -> Path:
    """A run directory as the trainer leaves it, with one (empty but complete) checkpoint step_3."""
    import yaml

    from data_prep.manifest import tokenizer_fingerprint
    from train.config import from_dict

    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    cfg = from_dict({"run": {"name": "run", "output_dir": str(tmp_path)}, "data": {"path": str(tmp_path / "shards")}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    tokenizer = tok / "tokenizer"
    (run / "data_manifest.json").write_text(json.dumps({"record_kind": "text", "tokenizer": {
        "path": str(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": 320, "eos_id": 0,
        "bos_id": 0, "pad_id": 1}}))
    (run / "checkpoints" / "step_3" / "checkpoint.json").write_text(json.dumps({"step": 3, "files": {}}))
    return run


def error_of(capsys) -> str:
    """The one `error: ...` line a command's main() printed to stderr (asserts there is exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


class Payload:
    """Unpickling it creates `marker` (open(marker, "w")): what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_evil_checkpoint(root: Path, marker: Path, step: int = 9) -> Path:
    """A checkpoint outside the run dir that passes every content check: payload files with a checkpoint.json
    recording their true sizes and checksums. The payload is shown to be live (unpickling a copy creates the
    marker, which is then removed), so a test asserting the marker never appears would notice if it ran."""
    import torch

    from train import checkpoint as ckpt

    evil = root / "evil" / f"step_{step}"
    evil.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"):
        torch.save(Payload(marker), evil / name)
    ckpt.write_manifest(evil, {"step": step})
    assert ckpt.verify(evil) is None
    probe = root / "probe"
    shutil.copy(evil / "mp_rank_00_model_states.pt", probe)
    torch.load(probe, weights_only=False)  # the payload is live...
    assert marker.exists()
    marker.unlink()  # ...and the marker is cleared for the real test
    return evil


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a planted checkpoint directory tmp_path/evil/step_9, the marker file its payload would create)."""
    marker = tmp_path / "PAYLOAD_RAN"
    return plant_evil_checkpoint(tmp_path, marker), marker


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory in which a property-based test rewrites its one input file for every example."""
    return tmp_path_factory.mktemp("fuzz")
