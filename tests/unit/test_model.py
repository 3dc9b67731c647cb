"""train.model without DeepSpeed: the model's HF config from model.hf_config; pretrained models as users bring them
(their tokenizer and framing must be the shards', safetensors only, the pad id batches use); fine-tuning parts
(freezing, LoRA, the dropout override); and the CPU dropout path (`use_cpu_dropout`, switch
`train.fast_cpu_dropout`), which computes what PyTorch's dropout and its SDPA math path compute given the same mask
and reproduces its masks from torch's RNG state (what activation-checkpoint recomputation and resume rely on)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from train import config as config_lib
from train.config import ModelConfig
from train.errors import ConfigError
from train.model import CpuDropout, _cpu_causal_sdpa, build_hf_config, build_model, keep_mask, use_cpu_dropout

# ------------------------------------------------------------------------------------------------------- the HF config


def test_hf_config_typo_is_rejected_with_nearest_key():
    tokenizer = {"vocab_size": 100, "eos_id": 0, "bos_id": None, "pad_id": None}
    with pytest.raises(ConfigError) as err:
        build_hf_config(ModelConfig(hf_config={"n_layers": 2}), tokenizer, seq_len=16)
    assert str(err.value) == "model.hf_config: 'n_layers' is not a gpt2 config key; did you mean 'n_layer'?"
    hf = build_hf_config(ModelConfig(hf_config={"n_layer": 2, "num_attention_heads": 4}), tokenizer, seq_len=16)
    assert (hf.n_layer, hf.n_head, hf.vocab_size, hf.bos_token_id) == (2, 4, 100, 0)
    with pytest.raises(ConfigError, match="data.seq_len=64 exceeds the model's 32 positions"):
        build_hf_config(ModelConfig(hf_config={"n_positions": 32}), tokenizer, seq_len=64)


# ----------------------------------------------------------------------------- pretrained models and fine-tuning parts


def cfg_for(finetune: dict, kind: str = "causal_lm", **model) -> config_lib.Config:
    return config_lib.from_dict({"task": {"kind": kind}, "model": model, "finetune": finetune,
                                 "data": {"path": "unused", "seq_len": 32}})


def manifest(kind: str = "text") -> dict:
    out = {"record_kind": kind, "tokenizer": {"path": "/nonexistent", "vocab_size": 512, "eos_id": 0, "bos_id": 0,
                                              "pad_id": 1}}
    if kind == "classification":
        out["classification"] = {"labels": ["neg", "pos"], "num_labels": 2}
    return out


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_embeddings_and_bottom_layers(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_embeddings": True, "freeze_bottom_layers": 1}, init="pretrained",
                  path=str(pretrained_models["llama"]))
    model = build_model(cfg, manifest())
    names = {n for n, _ in model.named_parameters()}
    frozen = names - trainable(model)
    assert frozen == {n for n in names if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert "lm_head.weight" in trainable(model)  # llama's head is not tied


def test_freeze_all_but_head_trains_only_the_classifier(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_all_but_head": True}, kind="classification", init="pretrained",
                  path=str(pretrained_models["bert"]))
    model = build_model(cfg, manifest("classification"))
    assert trainable(model) == {"classifier.weight", "classifier.bias"}
    assert model.config.num_labels == 2 and model.config.id2label == {0: "neg", 1: "pos"}


def test_freeze_all_but_a_tied_lm_head_is_refused(pretrained_models):
    cfg = cfg_for({"method": "freeze", "freeze_all_but_head": True}, init="pretrained",
                  path=str(pretrained_models["gpt2"]))
    with pytest.raises(ConfigError, match="has no separate lm_head head \\(it is tied to the input embeddings\\)"):
        build_model(cfg, manifest())


def test_lora_trains_adapters_and_the_classification_head_only(pretrained_models):
    cfg = cfg_for({"method": "lora", "lora_r": 4}, kind="classification", init="pretrained",
                  path=str(pretrained_models["gpt2"]))
    names = trainable(build_model(cfg, manifest("classification")))
    assert names and all("lora_" in n or ".score." in n for n in names)
    assert any(".score." in n for n in names) and any("lora_A" in n for n in names)


def test_a_pretrained_model_with_another_tokenizer_is_refused(pretrained_models, tiny_data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pretrained_models["gpt2"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7  # any byte of a tokenizer file
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    info = manifest()
    info["tokenizer"]["path"] = str(tiny_data["tokenizer"])
    cfg = cfg_for({"method": "full"}, init="pretrained", path=str(other))
    with pytest.raises(ConfigError, match=f"model.path: the tokenizer in {other} differs from"):
        build_model(cfg, info)
    # The model with the shards' own tokenizer is accepted and holds the weights it was saved with.
    model = build_model(cfg_for({"method": "full"}, init="pretrained", path=str(pretrained_models["gpt2"])), info)
    saved, state = load_file(str(pretrained_models["gpt2"] / "model.safetensors")), model.state_dict()
    assert saved and all(torch.equal(state[name], value) for name, value in saved.items())


def test_a_missing_pretrained_dir_is_one_error_at_build_time():
    with pytest.raises(ConfigError, match="model.path: /nonexistent is not a directory"):
        build_model(cfg_for({"method": "full"}, init="pretrained", path="/nonexistent"), manifest())


def test_dropout_override_reaches_every_dropout_of_the_model(pretrained_models):
    cfg = cfg_for({"method": "full"}, kind="classification", init="pretrained", path=str(pretrained_models["bert"]),
                  dropout=0.0)
    model = build_model(cfg, manifest("classification"))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


def test_a_pretrained_dir_with_only_pickled_weights_is_refused(pretrained_models, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(pretrained_models["gpt2"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = cfg_for({"method": "full"}, init="pretrained", path=str(pickled))
    with pytest.raises(ConfigError, match=f"model.path: cannot load {pickled} .*convert pickled weights to "
                                          "safetensors"):
        build_model(cfg, manifest())


def test_a_decoder_classifier_uses_the_pad_id_batches_are_padded_with(pretrained_models, tmp_path):
    other = tmp_path / "other_pad"
    shutil.copytree(pretrained_models["gpt2"], other)
    config = json.loads((other / "config.json").read_text())
    config["pad_token_id"] = 7
    (other / "config.json").write_text(json.dumps(config))
    cfg = cfg_for({"method": "full"}, kind="classification", init="pretrained", path=str(other))
    assert build_model(cfg, manifest("classification")).config.pad_token_id == 1  # the manifest's pad id


def test_a_pretrained_model_must_carry_the_tokenizer_and_framing_of_its_shards(tiny_data, pretrained_models,
                                                                              tmp_path):
    from data_prep.manifest import TOKENIZER_FILES
    from train.model import check_tokenizer

    manifest = json.loads((tiny_data["shards"] / "manifest.json").read_text())
    check_tokenizer(pretrained_models["gpt2"], manifest)  # the shards' own tokenizer: accepted
    bare = tmp_path / "bare"
    shutil.copytree(pretrained_models["gpt2"], bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError) as err:
        check_tokenizer(bare, manifest)
    assert str(err.value) == (
        f"model.path: {bare} holds no tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        f"vocab.json, ...), so nothing shows it matches {manifest['tokenizer']['path']}, the tokenizer the shards were "
        f"made with; copy the model's own tokenizer files into {bare}")
    bos_framed = {**manifest, "framing": {**manifest["framing"], "single": [[0], []]}}  # as if made with a BOS
    with pytest.raises(ConfigError) as err:
        check_tokenizer(pretrained_models["gpt2"], bos_framed)
    assert str(err.value) == (
        f"model.path: the tokenizer in {pretrained_models['gpt2']} frames records as [[], []] around a text, the "
        f"shards (made with {manifest['tokenizer']['path']}) as [[0], []]; re-run `python -m data_prep tokenize "
        f"--tokenizer {pretrained_models['gpt2']}`")


# ------------------------------------------------------------------------------------------------ the CPU dropout path


class _Attention:
    is_causal = True


def _qkv(seed: int = 0, shape=(2, 3, 16, 8)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).bfloat16().requires_grad_() for _ in range(3)]


def test_keep_mask_is_dropouts_multiplier_and_follows_torchs_rng():
    torch.manual_seed(3)
    mask = keep_mask(torch.Size((500, 400)), 0.1, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(mask, keep_mask(torch.Size((500, 400)), 0.1, torch.float32))
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1.0).div_(0.9).item()}
    assert abs((mask > 0).float().mean().item() - 0.9) < 0.003  # 200,000 draws: ~4 standard deviations


def _math_path(q, k, v, seed: int):
    """PyTorch's own math-path attention (causal, dropout 0.1) with the mask `keep_mask` draws after `seed`."""
    torch.manual_seed(seed)  # the same draw from torch's generator gives the same mask
    mask = keep_mask(torch.Size((*q.shape[:2], q.shape[2], q.shape[2])), 0.1, torch.float32) > 0
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.1, True, dropout_mask=mask)[0]


def _grads(out, inputs):
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return grads


def test_attention_in_fp32_is_pytorchs_math_path_given_the_same_mask():
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv())
    torch.manual_seed(5)
    ours, _ = _cpu_causal_sdpa(_Attention(), q, k, v, None, dropout=0.1, scaling=8 ** -0.5)
    ours_grads = _grads(ours, (q, k, v))
    reference = _math_path(q, k, v, seed=5).transpose(1, 2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)  # fp32 rounding of the same computation
    for ours_grad, theirs in zip(ours_grads, _grads(reference, (q, k, v))):
        torch.testing.assert_close(ours_grad, theirs, rtol=0, atol=1e-5)


def test_attention_in_bf16_runs_its_matmuls_in_bf16_within_bf16_rounding_of_the_math_path():
    q, k, v = _qkv()
    torch.manual_seed(5)
    ours, _ = _cpu_causal_sdpa(_Attention(), q, k, v, None, dropout=0.1, scaling=8 ** -0.5)
    assert ours.dtype == torch.bfloat16
    ours_grads = _grads(ours, (q, k, v))
    reference = _math_path(q, k, v, seed=5).transpose(1, 2)  # upcasts both matmuls to fp32
    scale = reference.float().abs().max().item()
    assert not torch.equal(ours, reference)  # the matmuls did run in bf16
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0, atol=scale * 2 ** -6)
    for ours_grad, theirs in zip(ours_grads, _grads(reference, (q, k, v))):
        torch.testing.assert_close(ours_grad.float(), theirs.float(), rtol=0,
                                   atol=theirs.float().abs().max().item() * 2 ** -5)


def test_attention_without_dropout_or_with_a_mask_is_transformers_sdpa():
    q, k, v = _qkv()
    for dropout, mask in ((0.0, None), (0.1, torch.ones(2, 1, 16, 16, dtype=torch.bool).tril())):
        torch.manual_seed(1)
        ours, _ = _cpu_causal_sdpa(_Attention(), q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
        torch.manual_seed(1)
        theirs, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
        assert torch.equal(ours, theirs)


def test_cpu_dropout_is_torchs_formula_and_identity_in_eval():
    x = torch.randn(64, 32).bfloat16()
    layer = CpuDropout(0.2)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    assert torch.equal(out, x * keep_mask(x.shape, 0.2, x.dtype))
    assert torch.equal(layer.eval()(x), x)


def _restore_attention_functions(monkeypatch) -> None:
    """use_cpu_dropout installs its attention process-wide; other tests get transformers' own back."""
    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", dict(ALL_ATTENTION_FUNCTIONS._local_mapping))


def _tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=32, use_cache=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _train(model: torch.nn.Module, steps: int, seed: int = 0) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        ids = (torch.randint(0, 128, (4, 1), generator=generator) + torch.arange(32)) % 128  # learnable: counting
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 128).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_recomputation_reproduces_the_masks(monkeypatch):
    """Activation checkpointing recomputes each block, masks included: the gradients must be those of the
    forward pass that was run, i.e. equal to training without checkpointing."""
    _restore_attention_functions(monkeypatch)
    plain, checkpointed = _tiny_gpt2(), _tiny_gpt2()
    for model in (plain, checkpointed):
        use_cpu_dropout(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert _train(plain, 10) == _train(checkpointed, 10)


def test_ten_steps_match_torch_dropout_within_noise(monkeypatch):
    """The optimised path draws other masks than the reference (torch's dropout), so the losses differ by dropout
    noise only; with dropout off the two paths are the same computation."""
    _restore_attention_functions(monkeypatch)
    reference = _train(_tiny_gpt2(), 10)
    fast = _tiny_gpt2()
    use_cpu_dropout(fast)
    assert any(isinstance(m, CpuDropout) for m in fast.modules())
    optimised = _train(fast, 10)
    gaps = [abs(a - b) for a, b in zip(reference, optimised)]
    assert max(gaps) < 0.15 and sum(gaps) / len(gaps) < 0.05  # dropout noise here: about 0.02 a step
    assert optimised[-1] < optimised[0] - 1.0

    no_dropout = GPT2Config(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=32, use_cache=False,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    reference = _train(AutoModelForCausalLM.from_config(no_dropout, attn_implementation="sdpa"), 10)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(no_dropout, attn_implementation="sdpa")
    use_cpu_dropout(model)
    assert _train(model, 10) == reference
