"""train.export on real 2-rank runs (the four short trainings of tests/distributed/conftest.py).

"The trained model" is checked without going through train.export: the validation loss the DeepSpeed engine logged
at the last step (metrics.jsonl) must be reproduced by the exported model on the same batches, and the exported
logits must equal those of a model loaded from DeepSpeed's own `zero_to_fp32.py` script (run as a subprocess) and,
where the checkpoint holds full module weights, from `mp_rank_00_model_states.pt`. Runs are fp32 where exact
equality is asserted (the engine's weights are then the fp32 masters); the ZeRO-0 run is bf16, to check that the
export takes the fp32 master copies rather than the bf16 module. --overwrite replaces only an earlier export.
Predicting with these runs: tests/distributed/test_predict.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_metrics
from train import export as export_lib
from train.export import export_model, load_run

# ------------------------------------------------------------------------------------------------ helpers


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def load_exported(directory, kind: str):
    return auto_class(kind).from_pretrained(directory).eval()


def val_metrics(model, run_dir) -> dict[str, float]:
    """The validation pass exactly as the Trainer runs it on 2 ranks (same micro-batches, same sums)."""
    from data_prep.shards import ShardSet
    from train.data import IGNORE, Documents, TokenWindows, eval_batches
    from train.model import pad_id
    from train.tasks import EvalSums

    cfg, manifest = load_run(run_dir)
    shards = ShardSet(cfg.data.path, cfg.data.val_split)
    kind = cfg.task.kind
    items = (TokenWindows(shards, cfg.data.seq_len) if kind == "causal_lm" else
             Documents(shards, cfg.data.seq_len, kind, pad_id(manifest), packing=cfg.task.sft_packing))
    num_labels = manifest["classification"]["num_labels"] if kind == "classification" else 0
    sums = EvalSums(kind, num_labels, "cpu")
    with torch.no_grad():
        for rank in range(2):
            for indices in eval_batches(len(items), cfg.train.micro_batch_size, 2, rank, cfg.eval.batches):
                batch, _ = items.model_batch(indices if len(indices) else np.array([len(items) - 1]))
                labels = batch.pop("labels")
                if not len(indices):
                    labels.fill_(IGNORE)
                sums.add(model(**batch).logits, labels)
    return {f"val/{k}": v for k, v in sums.metrics().items()}


def logged_val(run_dir) -> dict[str, float]:
    metrics = read_metrics(run_dir)
    last = max(s for s, m in metrics.items() if "val/loss" in m)
    return {k: v for k, v in metrics[last].items() if k.startswith("val/")}


def fixed_batch(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    input_ids = torch.randint(2, 512, (3, 24))
    mask = torch.ones_like(input_ids)
    mask[1, 17:] = 0
    input_ids[1, 17:] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def zero_to_fp32_reference(run_dir, tag: str, exported, kind: str, tmp_path):
    """The model DeepSpeed's own conversion script (saved next to the checkpoints) yields, loaded strictly into a
    plain model built from the exported config.json."""
    from transformers import AutoConfig

    out = tmp_path / f"zero_to_fp32_{tag}"
    subprocess.run([sys.executable, str(run_dir / "checkpoints" / "zero_to_fp32.py"), str(run_dir / "checkpoints"),
                    str(out), "--tag", tag], check=True, capture_output=True, text=True, cwd=ROOT)
    state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model = auto_class(kind).from_config(AutoConfig.from_pretrained(exported))
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_tokenizer(exported, run_dir) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, manifest = load_run(run_dir)
    source = manifest["tokenizer"]["path"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).read_bytes() == (Path(source) / name).read_bytes()
    text = "The quick model reads every shard."
    reference = Tokenizer.from_file(f"{source}/tokenizer.json").encode(text, add_special_tokens=False).ids
    assert AutoTokenizer.from_pretrained(exported)(text, add_special_tokens=False)["input_ids"] == reference


def assert_val_reproduced(model, run_dir, rel: float = 1e-5) -> None:
    ours, logged = val_metrics(model, run_dir), logged_val(run_dir)
    assert ours.keys() >= logged.keys()
    for key, value in logged.items():
        assert ours[key] == pytest.approx(value, rel=rel, abs=rel), (key, ours[key], value)


# ------------------------------------------------------------------------------------------------ (a) round trips


def test_zero2_export_equals_the_trained_model(zero2_run, tmp_path):
    from train.model import build_model

    out = tmp_path / "zero2"
    proc = subprocess.run([sys.executable, "-m", "train.export", str(zero2_run), "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported step_6" in proc.stdout and "model.safetensors" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "generation_config.json",
                                                     "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".zero2*"))  # the temp dir was renamed into place
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and config["architectures"] == ["GPT2LMHeadModel"]
    info = json.loads((out / "export.json").read_text())
    assert info["checkpoint"] == "step_6" and info["zero_stage"] == 2 and info["format"] == "full"
    check_tokenizer(out, zero2_run)

    model = load_exported(out, "causal_lm")
    assert_val_reproduced(model, zero2_run)
    batch = fixed_batch("causal_lm")
    ours = logits(model, batch)
    # Reference 1: the module weights the engine saved (fp32 run: they are the masters) in build_model's module.
    cfg, manifest = load_run(zero2_run)
    states = torch.load(zero2_run / "checkpoints/step_6/mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    reference = build_model(cfg, manifest)
    reference.load_state_dict(states["module"], strict=True)
    torch.testing.assert_close(ours, logits(reference.eval(), batch), rtol=0, atol=1e-5)
    # Reference 2: DeepSpeed's zero_to_fp32.py, a plain state dict.
    torch.testing.assert_close(ours, logits(zero_to_fp32_reference(zero2_run, "step_6", out, "causal_lm", tmp_path),
                                            batch), rtol=0, atol=1e-5)

    # --step N exports that checkpoint, not the latest.
    old = export_model(zero2_run, tmp_path / "step3", step=3, log=lambda *_: None)
    assert json.loads((old / "export.json").read_text())["checkpoint"] == "step_3"
    step3 = logits(load_exported(old, "causal_lm"), batch)
    assert not torch.allclose(step3, ours)
    torch.testing.assert_close(step3, logits(zero_to_fp32_reference(zero2_run, "step_3", old, "causal_lm", tmp_path),
                                             batch), rtol=0, atol=1e-5)


def test_zero3_export_with_frozen_parameters_equals_the_trained_model(zero3_run, pretrained_models, tmp_path):
    out = export_model(zero3_run, tmp_path / "zero3", log=lambda *_: None)
    info = json.loads((out / "export.json").read_text())
    assert info["zero_stage"] == 3 and info["task"] == "sft"
    check_tokenizer(out, zero3_run)
    model = load_exported(out, "sft")
    assert model.config.use_cache is True
    assert_val_reproduced(model, zero3_run)  # packed sft rows, 4-D masks: the trainer's exact batches
    batch = fixed_batch("sft")
    torch.testing.assert_close(logits(model, batch),
                               logits(zero_to_fp32_reference(zero3_run, "step_4", out, "sft", tmp_path), batch),
                               rtol=0, atol=1e-5)
    # The frozen embeddings are the base model's; everything trained moved.
    ours, base = load_file(out / "model.safetensors"), load_file(pretrained_models["llama"] / "model.safetensors")
    assert torch.equal(ours["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    moved = [k for k in base if not torch.equal(ours[k], base[k])]
    assert len(moved) == len(base) - 1


def test_zero0_bf16_export_takes_the_fp32_masters(zero0_bf16_run, pretrained_models, tmp_path):
    out = export_model(zero0_bf16_run, tmp_path / "zero0", log=lambda *_: None)
    info = json.loads((out / "export.json").read_text())
    assert info["zero_stage"] == 0 and info["precision"] == "bf16"
    ours = load_file(out / "model.safetensors")
    base = load_file(pretrained_models["gpt2"] / "model.safetensors")
    module = torch.load(zero0_bf16_run / "checkpoints/step_3/mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    frozen = [k for k in ours if k.startswith("transformer.h.0.")]
    trained = [k for k in ours if k not in frozen and k != "lm_head.weight"]
    assert frozen and trained
    for key in frozen:  # never updated: the base model's fp32 value, not its bf16 rounding in the module
        assert torch.equal(ours[key], base[key]), key
    for key in trained:  # the fp32 master: rounds to the bf16 module weight, but is not itself bf16
        assert ours[key].dtype == torch.float32
        assert torch.equal(ours[key].bfloat16(), module[key]), key
    assert any(not torch.equal(ours[k], ours[k].bfloat16().float()) for k in trained)
    assert_val_reproduced(load_exported(out, "causal_lm"), zero0_bf16_run, rel=2e-2)  # the engine ran in bf16


# ------------------------------------------------------------------------------------------------ (b) LoRA


def test_lora_merged_export_equals_the_adapter_and_changes_only_adapted_weights(lora_run, pretrained_models,
                                                                               tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    merged = export_model(lora_run, tmp_path / "merged", log=lambda *_: None)
    adapter_dir = export_model(lora_run, tmp_path / "adapter", merge=False, log=lambda *_: None)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter_dir.iterdir()}
    assert not (adapter_dir / "config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    check_tokenizer(merged, lora_run)

    model = load_exported(merged, "classification")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert_val_reproduced(model, lora_run)
    base = AutoModelForSequenceClassification.from_pretrained(pretrained_models["gpt2"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = fixed_batch("classification")
    torch.testing.assert_close(logits(model, batch), logits(peft_model, batch), rtol=0, atol=1e-5)

    # Against the pretrained base: only the LoRA-adapted matrices (gpt2: c_attn) changed, plus the new head.
    ours = load_file(merged / "model.safetensors")
    pretrained = load_file(pretrained_models["gpt2"] / "model.safetensors")
    assert set(ours) - set(pretrained) == {"score.weight"}
    changed = sorted(k for k in pretrained if k in ours and not torch.equal(ours[k], pretrained[k]))
    assert changed == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]

    best = (lora_run / "checkpoints/best").read_text()
    exported_best = export_model(lora_run, tmp_path / "best", step="best", log=lambda *_: None)
    assert json.loads((exported_best / "export.json").read_text())["checkpoint"] == best


# ------------------------------------------------------------------------------------------------ (c) --overwrite


def test_export_overwrite_replaces_an_earlier_export_only(zero2_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert export_lib.main([str(zero2_run), "--output", str(out), "--step", "3"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["checkpoint"] == "step_3" and "model.safetensors" in info["xxh3_128"]
    assert export_lib.main([str(zero2_run), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["checkpoint"] == "step_6"
    capsys.readouterr()
    assert export_lib.main([str(zero2_run), "--output", str(zero2_run / "checkpoints"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output {zero2_run / 'checkpoints'} is not an earlier export "
                                               "(no export.json written by train.export); --overwrite replaces only "
                                               "those. Choose a new directory")
    assert (zero2_run / "checkpoints/step_6").is_dir()
